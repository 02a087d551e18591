"""What the SLS emulator holds for the tests' consumer group: shards, owners and checkpoints."""
import base64

from tests.sdk_consumer import content
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


def owners(emulator, dead=(), group=GROUP):
    """{shard: consumers (not in `dead`) that hold it or listed it in their last heartbeat} for
    every shard, plus the set of finished shards; one consistent snapshot."""
    state = logstore_state(emulator)
    group_state = state.get("consumer_groups", {}).get(group, {})
    checkpoints = group_state.get("checkpoints", {})
    finished = {int(shard) for shard, info in state["shards"].items()
                if info["status"] == "readonly" and checkpoints.get(shard) == info["end_cursor"]}
    found = {int(shard): set() for shard in state["shards"]}
    for name, held in group_state.get("consumers", {}).items():
        if name not in dead:
            for shard in held + group_state["heartbeats"][name]["listed"]:
                found[shard].add(name)
    return found, finished


def one_owner_each(emulator, dead=(), group=GROUP):
    """True when (in a group without order) every shard not yet finished is held, and listed in
    its last heartbeat, by exactly one live consumer, and no live one holds or lists a finished shard."""
    found, finished = owners(emulator, dead, group)
    return all(len(names) == (0 if shard in finished else 1) for shard, names in found.items())


def shard_contents(client, emulator):
    """{shard: [[request_traceid of each log] of each LogGroup, in cursor order]}, read with an SDK
    LogClient for the emulator (its proxy settings applied to os.environ)."""
    contents = {}
    for shard in shard_states(emulator):
        groups = contents.setdefault(int(shard), [])
        cursor = client.get_begin_cursor(emulator.project, emulator.logstore, int(shard)).get_cursor()
        while True:
            response = client.pull_logs(emulator.project, emulator.logstore, int(shard), cursor, count=1000)
            groups += [[content(log, "request_traceid") for log in group.Logs]
                       for group in response.get_loggroup_list().LogGroups]
            if response.get_next_cursor() == cursor:
                break
            cursor = response.get_next_cursor()
    return contents
