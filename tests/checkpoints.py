"""What the SLS emulator holds for the tests' consumer group: shards, owners and checkpoints."""
import base64

from tests.sls_emulator import CURSOR_BASE, SHARD_CURSOR_STRIDE

GROUP = "test-group"  # tests/forwarder_process.py's SLS_CG


def logstore_state(emulator):
    return emulator.state()["logstores"][emulator.logstore]


def shard_states(emulator):
    """{shard id (str): {"begin_cursor", "end_cursor", "logs", ...}}."""
    return logstore_state(emulator)["shards"]


def group_state(emulator, group=GROUP):
    """The consumer group's state ({} before it exists): "consumers", "checkpoints", ..."""
    return logstore_state(emulator).get("consumer_groups", {}).get(group, {})


def assignments(emulator, group=GROUP):
    """{consumer name: [shards it holds]} for the live consumers of the group."""
    return group_state(emulator, group).get("consumers", {})


def checkpoint_positions(emulator, group=GROUP):
    """{shard: index of the LogGroup its stored checkpoint points at}."""
    positions = {}
    for shard, cursor in group_state(emulator, group).get("checkpoints", {}).items():
        number = int(base64.b64decode(cursor))
        positions[int(shard)] = number - CURSOR_BASE - int(shard) * SHARD_CURSOR_STRIDE
    return positions


def checkpoints_at_end(emulator, group=GROUP):
    """True once every shard's checkpoint is its end cursor: everything was processed."""
    state = logstore_state(emulator)
    ends = {shard: info["end_cursor"] for shard, info in state["shards"].items()}
    return state.get("consumer_groups", {}).get(group, {}).get("checkpoints") == ends


def assert_checkpoints_at_end(emulator, group=GROUP):
    state = logstore_state(emulator)
    ends = {shard: info["end_cursor"] for shard, info in state["shards"].items()}
    assert state["consumer_groups"][group]["checkpoints"] == ends


def checkpoints_not_moved(emulator, group=GROUP):
    """True while no shard has a checkpoint past its first log (absent or equal to the begin cursor)."""
    shards = shard_states(emulator)
    return all(cursor == shards[shard]["begin_cursor"]
               for shard, cursor in group_state(emulator, group).get("checkpoints", {}).items())
