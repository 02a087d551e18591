"""The SDK internals sync_waf_to_syslog.py relies on (its sdk_internals()): the start-up check, and
canaries proving the pinned SDK still USES each one as the forwarder expects.

Each canary watches the real SDK at work against the SLS emulator and returns (ok, what it saw). Each
is run twice: against the real SDK class, where it must pass, and against a deliberately broken
stand-in of that class, where it must fail, which shows it can. After changing the SDK pin in
requirements.txt, run this file (README.md, "Upgrading the SDK"):
    python -m pytest -q tests/test_sdk_canaries.py
"""
import collections
import copy
import re
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from aliyun.log import LogClient
from aliyun.log.consumer import ConsumerProcessorBase, ConsumerWorker, CursorPosition, LogHubConfig
from aliyun.log.consumer.checkpoint_tracker import ConsumerCheckpointTracker
from aliyun.log.consumer.consumer_client import ConsumerClient
from aliyun.log.consumer.heart_beat import ConsumerHeatBeat
from aliyun.log.consumer.preprocessor import to_log_group_list_pb
from aliyun.log.consumer.shard_worker import ShardConsumerWorker
from aliyun.log.credentials import Credentials, CredentialsProvider
from aliyun.log.pulllog_response import PullLogResponse

import sync_waf_to_syslog as fwd
from tests.encoding import make_settings
from tests.forwarder_process import SCRIPT, with_fault
from tests.polling import poll
from tests.sdk_consumer import AKID, LOGSTORE, PROJECT, SECRET, emulator_for_sdk
from tests.waf_logs import realistic_logs

GROUP = "canaries"
LOGS = 40  # 8 LogGroups of 5, over 2 shards


@pytest.fixture
def emulator(monkeypatch):
    with emulator_for_sdk(monkeypatch, 2, group_size=5) as emu:
        emu.add_logs(realistic_logs(LOGS, seed=5))
        yield emu


def config(emulator, name="canary"):
    return LogHubConfig(emulator.endpoint, AKID, SECRET, PROJECT, LOGSTORE, GROUP, name,
                        cursor_position=CursorPosition.BEGIN_CURSOR, heartbeat_interval=1,
                        data_fetch_interval=0.05, max_fetch_log_group_size=2)


def consumer_client(emulator, name="canary", client_class=ConsumerClient):
    """A ConsumerClient of the canaries' consumer group, which it creates if need be."""
    client = client_class(emulator.endpoint, AKID, SECRET, PROJECT, LOGSTORE, GROUP, name)
    client.ensure_consumer_group_created(2, False)
    return client


class Probe(ConsumerProcessorBase):
    """Records what the SDK hands it: (its shard_id, the tracker's shard, the data) per batch; its
    _preprocessor marks what it returns, so process() shows whether the SDK used it."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen
        sdk_preprocessor = self._preprocessor

        def marking_preprocessor(response):
            seen["preprocessed"].append(response)
            return ("marked", sdk_preprocessor(response))

        self._preprocessor = marking_preprocessor

    def process(self, data, tracker):
        self.seen["processed"].append((getattr(self, "shard_id", None), tracker.shard_id, data))
        self.seen["trackers"].append(tracker)
        self.save_checkpoint(tracker, force=True)


def logs_in(batches):
    return sum(len(group.Logs) for _, _, (_, groups) in batches for group in groups.LogGroups)


def run_worker(emulator, worker_class=ConsumerWorker, processor_class=Probe, until=None, timeout=20):
    """Start a worker of worker_class with processor_class(seen); wait for until(worker, seen) (by
    default: every log processed); return (worker, seen) with the worker still running."""
    seen = collections.defaultdict(list)
    worker = worker_class(processor_class, config(emulator), args=(seen,))
    worker.start()
    until = until or (lambda _, observed: logs_in(observed["processed"]) >= LOGS)
    poll(lambda: until(worker, seen), bool, timeout)
    return worker, seen


def stop(worker):
    worker.shutdown()
    worker.join(30)


# ------------------------------------------------------------------------------------------------
# The canaries: one per entry of fwd.sdk_internals()
# ------------------------------------------------------------------------------------------------

def run_shard_consumer(emulator, shard_consumer_class):
    """A shard consumer of shard 0 with a Probe, run until it processed two batches; (it, what the
    Probe saw)."""
    seen = collections.defaultdict(list)
    with ThreadPoolExecutor(2) as executor:
        consumer = shard_consumer_class(consumer_client(emulator), 0, "canary", Probe(seen),
                                        CursorPosition.BEGIN_CURSOR, None, executor=executor,
                                        max_fetch_log_group_size=2)

        def consume():
            consumer.consume()
            return seen["processed"]

        poll(consume, lambda processed: len(processed) >= 2, timeout=15, interval=0.05)
    return consumer, seen


def canary_preprocessor(emulator, shard_consumer_class):
    """A shard consumer hands each pull to processor._preprocessor and process() gets its result."""
    _, seen = run_shard_consumer(emulator, shard_consumer_class)
    processed = seen["processed"]
    ok = bool(processed) and all(isinstance(data, tuple) and data[0] == "marked" for _, _, data in processed) \
        and all(isinstance(response, PullLogResponse) for response in seen["preprocessed"])
    return ok, f"{len(processed)} batches processed; first: {str(processed[:1])[:200]}"


def canary_checkpoint_tracker(emulator, shard_consumer_class):
    """process() gets the shard consumer's own checkpoint_tracker, so what it saves there is what
    the forwarder reads from shard_consumers[shard].checkpoint_tracker."""
    consumer, seen = run_shard_consumer(emulator, shard_consumer_class)
    own = [tracker is consumer.checkpoint_tracker for tracker in seen["trackers"]]
    return bool(own) and all(own), f"the consumer's own tracker in each batch: {own}"


def canary_raw_body(emulator, response_class):
    """A pull keeps its uncompressed body, unparsed, in _raw_uncompressed_body."""
    client = LogClient(emulator.endpoint, AKID, SECRET)
    cursor = client.get_cursor(PROJECT, LOGSTORE, 0, "begin").get_cursor()
    pulled = client.pull_logs(PROJECT, LOGSTORE, 0, cursor, count=10)
    response = pulled if response_class is PullLogResponse else \
        response_class(pulled._raw_uncompressed_body, pulled.headers)
    raw = getattr(response, "_raw_uncompressed_body", None)
    ok = isinstance(raw, bytes) and \
        sum(len(group.Logs) for group in fwd.read_log_groups(raw)) == response.get_log_count()
    return ok, f"_raw_uncompressed_body is {type(raw).__name__}"


def counting_rounds(worker_class, counts):
    """worker_class, counting in `counts` its rounds ("rounds": the heartbeat is asked for the held
    shards once at the start of every round) and its calls of clean_shard_consumer ("cleaned")."""
    class Counting(worker_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            held = self.heart_beat.get_held_shards

            def counted():
                counts["rounds"] += 1
                return held()

            self.heart_beat.get_held_shards = counted

        def clean_shard_consumer(self, owned_shards):
            counts["cleaned"] += 1
            super().clean_shard_consumer(owned_shards)

    return Counting


def canary_clean_shard_consumer(emulator, worker_class):
    """ConsumerWorker.run calls clean_shard_consumer once in every round (the stuck-loop check)."""
    counts = collections.Counter()
    worker, _ = run_worker(emulator, counting_rounds(worker_class, counts), until=lambda *_: counts["rounds"] >= 20)
    stop(worker)
    ok = counts["rounds"] >= 20 and abs(counts["rounds"] - counts["cleaned"]) <= 1
    return ok, f"{counts['rounds']} rounds, {counts['cleaned']} calls of clean_shard_consumer"


def canary_fetch_interval(emulator, worker_class):
    """ConsumerWorker.run reads option.data_fetch_interval in every round (FetchBudget slows the
    rounds down without a backlog): a longer one set while it runs takes effect."""
    counts = collections.Counter()
    worker, _ = run_worker(emulator, counting_rounds(worker_class, counts))
    try:
        worker.option.data_fetch_interval = 0.5
        time.sleep(0.6)
        before = counts["rounds"]
        time.sleep(2)
        rounds = counts["rounds"] - before
        return rounds <= 6, f"{rounds} rounds in 2 s with a 0.5 s interval set while it ran"
    finally:
        stop(worker)


def canary_max_fetch_groups(emulator, shard_consumer_class):
    """A shard consumer asks each pull for max_fetch_log_group_size LogGroups, read at the pull:
    changed after it started (FetchBudget does so before every round), the next pulls follow."""
    seen = collections.defaultdict(list)
    with ThreadPoolExecutor(2) as executor:
        consumer = shard_consumer_class(consumer_client(emulator), 0, "canary", Probe(seen),
                                        CursorPosition.BEGIN_CURSOR, None, executor=executor,
                                        max_fetch_log_group_size=3)
        consumer.max_fetch_log_group_size = 1

        def consume():
            consumer.consume()
            return seen["processed"]

        poll(consume, lambda processed: len(processed) >= 3, timeout=15, interval=0.05)
    sizes = [len(groups.LogGroups) for _, _, (_, groups) in seen["processed"]]
    return bool(sizes) and set(sizes) == {1}, f"LogGroups per pull: {sizes}"


def canary_worker_attributes(emulator, worker_class):
    """The worker keeps its shard consumers in shard_consumers, and every one of them, and the
    heartbeat, uses the worker's consumer_client."""
    worker, seen = run_worker(emulator, worker_class)
    try:
        consumers = dict(getattr(worker, "shard_consumers", {}))
        client = getattr(worker, "consumer_client", None)
        ok = sorted(consumers) == [0, 1] and client is not None \
            and all(consumer.log_client is client for consumer in consumers.values()) \
            and worker.heart_beat.log_client is client
        return ok, f"shard consumers {sorted(consumers)}"
    finally:
        stop(worker)


def canary_worker_init(emulator, worker_class):
    """WafConsumerWorker.__init__, which replaces ConsumerWorker.__init__, sets all it sets."""
    seen = collections.defaultdict(list)
    sdk_worker = worker_class(Probe, config(emulator), args=(seen,))
    forwarder = types.SimpleNamespace(budget=fwd.FetchBudget(make_settings()))  # all its __init__ reads
    ours = fwd.WafConsumerWorker(forwarder, config(emulator, "ours"), consumer_client(emulator, "ours"))
    for worker in (sdk_worker, ours):
        worker.executor.shutdown()
    missing = sorted(set(vars(sdk_worker)) - set(vars(ours)))
    return not missing, f"set by the SDK's __init__, not by WafConsumerWorker's: {missing}"


class CountingCredentials(CredentialsProvider):
    """The canaries' AccessKey, counting the requests signed with it."""

    def __init__(self):
        self.signed = 0

    def get_credentials(self):
        self.signed += 1
        return Credentials(AKID, SECRET)


def canary_mclient(emulator, client_class):
    """A consumer client sends every request, heartbeats included, through its LogClient mclient
    (which ResilientConsumerClient replaces by one with a credentials provider)."""
    client = client_class(emulator.endpoint, AKID, SECRET, PROJECT, LOGSTORE, GROUP, "canary")
    credentials = CountingCredentials()
    client.mclient = LogClient(emulator.endpoint, credentials_provider=credentials)
    requests = lambda: emulator.state()["requests_by_access_key"].get(AKID, 0)  # noqa: E731
    before = requests()
    client.ensure_consumer_group_created(2, False)
    cursor = client.get_begin_cursor(0)
    client.pull_logs(0, cursor, count=2)
    client.heartbeat([], [])
    client.update_check_point(0, "canary", cursor)
    client.get_check_point(0)
    client.get_cursor(0, "end")
    sent = requests() - before
    return sent >= 7 and credentials.signed == sent, f"{sent} requests, {credentials.signed} through mclient"


def canary_heartbeat_lists(emulator, heartbeat_class):
    """The heartbeat keeps mheld_shards (the shards granted) and mheart_shards (those it reports)
    and changes them under its lock: while the lock is held elsewhere, its thread waits."""
    beat = heartbeat_class(consumer_client(emulator), 1, 2)
    beat.start()
    try:
        poll(lambda: getattr(beat, "mheld_shards", None), bool, timeout=15)
        held, reported = list(getattr(beat, "mheld_shards", [])), list(getattr(beat, "mheart_shards", []))
        requests = lambda: emulator.state()["requests"].get("heartbeat", 0)  # noqa: E731
        with beat.lock:
            before = requests()
            time.sleep(3.5)  # three heartbeat intervals
            during = requests() - before
        ok = held == [0, 1] and set(held) <= set(reported) and during <= 1
        return ok, f"held {held}, reported {reported}, {during} heartbeats while the lock was held"
    finally:
        beat.shutdown()
        beat.join(10)


class FirstShardOnly(ConsumerClient):
    """A client whose heartbeat answers keep shard 0 only."""

    def heartbeat(self, shards, responce=None):
        answer = []
        beat = super().heartbeat(shards, answer)
        responce.extend(shard for shard in answer if shard == 0)
        return beat


def canary_heartbeat_client(emulator, heartbeat_class):
    """The heartbeat thread asks its log_client's heartbeat() for the shards, so that
    ResilientConsumerClient.heartbeat can leave out those ListShards does not list."""
    beat = heartbeat_class(consumer_client(emulator, client_class=FirstShardOnly), 1, 2)
    beat.start()
    try:
        held = poll(beat.get_held_shards, bool, timeout=15)
        return held == [0], f"held {held} (the emulator grants [0, 1])"
    finally:
        beat.shutdown()
        beat.join(10)


def canary_remove_heart_shard(emulator, heartbeat_class):
    """remove_heart_shard takes a shard out of both lists."""
    beat = heartbeat_class(consumer_client(emulator), 1, 2)
    beat.mheld_shards, beat.mheart_shards = [0, 1], [0, 1]
    beat.remove_heart_shard(0)
    return beat.mheld_shards == [1] and beat.mheart_shards == [1], f"{beat.mheld_shards}, {beat.mheart_shards}"


def canary_heartbeat_answered(emulator, heartbeat_class):
    """The heartbeat notes in last_hearbeat_successed_unixtime when SLS answered it."""
    beat = heartbeat_class(consumer_client(emulator), 1, 2)
    before = beat.last_hearbeat_successed_unixtime
    beat.start()
    try:
        answered = poll(lambda: emulator.state()["requests"].get("heartbeat", 0), bool, timeout=15)
        noted = poll(lambda: getattr(beat, "last_hearbeat_successed_unixtime", before) != before, bool, timeout=1.5)
        return answered and noted, f"{answered} heartbeats answered; noted: {noted}"
    finally:
        beat.shutdown()
        beat.join(10)


def canary_tracker(emulator, tracker_class):
    """A checkpoint tracker writes under its lock (so save_delivered_checkpoint and the SDK's flush
    exclude each other) and records the written cursor in last_persistent_checkpoint."""
    tracker = tracker_class(consumer_client(emulator), "canary", 0)
    end = LogClient(emulator.endpoint, AKID, SECRET).get_cursor(PROJECT, LOGSTORE, 0, "end").get_cursor()
    tracker.set_memory_check_point(end)
    stored = lambda: emulator.state()["logstores"][LOGSTORE]["consumer_groups"][GROUP]["checkpoints"]  # noqa: E731
    flush = threading.Thread(target=tracker.flush_check_point)
    with tracker.lock:
        flush.start()
        time.sleep(0.5)
        written_while_locked = bool(stored())
    flush.join(15)
    ok = not written_while_locked and stored() == {"0": end} and tracker.last_persistent_checkpoint == end
    return ok, f"written while locked: {written_while_locked}; stored {stored()}"


def canary_shut_down_flag(emulator, worker_class):
    """Setting shut_down_flag ends the worker's loop (it shuts its shards down and returns) while the
    heartbeat, which forwarder's run() stops later, keeps running."""
    worker, _ = run_worker(emulator, worker_class)
    worker.shut_down_flag = True
    worker.join(5)
    ended, beating = not worker.is_alive(), worker.heart_beat.is_alive()
    stop(worker)
    return ended and beating, f"loop ended: {ended}, heartbeat alive: {beating}"


def canary_shard_id(emulator, processor_class):
    """The SDK tells each processor its shard (processor.shard_id, set by initialize())."""
    worker, seen = run_worker(emulator, processor_class=processor_class)
    stop(worker)
    processed = seen["processed"]
    ok = logs_in(processed) >= LOGS and all(shard == tracker_shard for shard, tracker_shard, _ in processed)
    return ok, f"(processor shard_id, tracker shard) seen: {sorted({(s, t) for s, t, _ in processed})}"


def canary_session(emulator, log_client_class):
    """A LogClient sends every request through its requests Session (_session), so the response
    hook bound_answers adds there sees every answer before its body is read."""
    client = log_client_class(emulator.endpoint, AKID, SECRET)
    seen = []
    client._session.hooks["response"].append(lambda response, **_: seen.append(response.status_code))
    client.list_shards(PROJECT, LOGSTORE)
    cursor = client.get_cursor(PROJECT, LOGSTORE, 0, "begin").get_cursor()
    client.pull_logs(PROJECT, LOGSTORE, 0, cursor, count=2)
    return seen == [200, 200, 200], f"the session's hook saw {seen} for 3 requests"


def canary_pulls_through_mclient(emulator, consumer_client_class):
    """A ConsumerClient pulls through its LogClient, mclient (the one bound_answers bounds)."""
    client = consumer_client_class(emulator.endpoint, AKID, SECRET, PROJECT, LOGSTORE, GROUP, "canary")
    seen = []
    client.mclient._session.hooks["response"].append(lambda response, **_: seen.append(response.status_code))
    cursor = client.get_begin_cursor(0)
    client.pull_logs(0, cursor, count=2)
    return seen == [200, 200], f"mclient's session saw {seen} for a cursor and a pull"


# ------------------------------------------------------------------------------------------------
# Broken stand-ins: each breaks the one thing its canary watches
# ------------------------------------------------------------------------------------------------

class IgnoresThePreprocessor(ShardConsumerWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.preprocessor = to_log_group_list_pb


class HandsProcessACopyOfItsTracker(ShardConsumerWorker):
    def _generate_next_task(self):
        kept, self.checkpoint_tracker = self.checkpoint_tracker, copy.copy(self.checkpoint_tracker)
        try:
            super()._generate_next_task()
        finally:
            self.checkpoint_tracker = kept


class ParsesAtOnce(PullLogResponse):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.get_loggroup_list()  # the parse drops the raw body


class LoopWithoutCleanup(ConsumerWorker):
    """The SDK's loop without clean_shard_consumer; it ends when running() says so and waits
    pause() between rounds."""

    def running(self):
        return not self.shut_down_flag

    def pause(self):
        return self.option.data_fetch_interval

    def run(self):
        self.heart_beat.start()
        while self.running():
            for shard in self.heart_beat.get_held_shards():
                self._get_shard_consumer(shard).consume()
            time.sleep(self.pause())
        self.shutdown_and_wait()


class KeepsItsFirstInterval(LoopWithoutCleanup):
    def pause(self):
        self.__dict__.setdefault("first_interval", self.option.data_fetch_interval)
        return self.first_interval


class KeepsItsFirstCount(ShardConsumerWorker):
    @property
    def max_fetch_log_group_size(self):
        return self.__dict__["first_count"]

    @max_fetch_log_group_size.setter
    def max_fetch_log_group_size(self, count):
        self.__dict__.setdefault("first_count", count)


class FreshClientPerShard(ConsumerWorker):
    def _get_shard_consumer(self, shard_id):
        if shard_id not in self.shard_consumers:
            self.consumer_client = ConsumerClient(
                self.option.endpoint, AKID, SECRET, PROJECT, LOGSTORE, GROUP, self.option.consumer_name)
        return super()._get_shard_consumer(shard_id)


class SetsMore(ConsumerWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending_shards = {}


class HeartbeatsWithItsFirstClient(ConsumerClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_client = self.mclient

    def heartbeat(self, shards, responce=None):
        responce.extend(self.first_client.heart_beat(self.mproject, self.mlogstore, self.mconsumer_group,
                                                     self.mconsumer, shards).get_shards())
        return True


class HeartbeatLoop(ConsumerHeatBeat):
    """The SDK's heartbeat loop, simplified: it asks shards_granted() (None if it failed) and
    changes the lists under lists_lock()."""

    def shards_granted(self):
        granted = []
        return granted if self.log_client.heartbeat(self.mheart_shards, granted) else None

    def lists_lock(self):
        return self.lock

    def run(self):
        while not self.shut_down_flag:
            granted = self.shards_granted()
            if granted is not None:
                with self.lists_lock():
                    self.mheart_shards, self.mheld_shards = list(set(self.mheart_shards + granted)), granted
            time.sleep(self.heartbeat_interval)


class LocksSomethingElse(HeartbeatLoop):
    own_lock = threading.RLock()

    def lists_lock(self):
        return self.own_lock


class AsksSlsItself(HeartbeatLoop):
    """Sends the heartbeat through its client's LogClient, past the client's heartbeat()."""

    def shards_granted(self):
        client = self.log_client
        return client.mclient.heart_beat(client.mproject, client.mlogstore, client.mconsumer_group,
                                         client.mconsumer, self.mheart_shards).get_shards()


class RenamedLists(ConsumerHeatBeat):
    def remove_heart_shard(self, shard):
        with self.lock:
            self.mheld_shards = [s for s in self.mheld_shards if s != shard]


class FlushesWithoutTheLock(ConsumerCheckpointTracker):
    def flush_check_point(self):
        self.consumer_group_client.update_check_point(self.shard_id, self.consumer_name, self.temp_check_point)
        self.last_persistent_checkpoint = self.temp_check_point


class IgnoresShutDownFlag(LoopWithoutCleanup):
    """Its loop ends through shutdown() only, not when shut_down_flag is set."""

    def shutdown(self):
        self.stopping = True
        super().shutdown()

    def running(self):
        return not getattr(self, "stopping", False)


class ForgetsItsShard(Probe):
    def initialize(self, shard):
        pass


class SessionPerRequest(LogClient):
    def _get_http_sender(self, method):
        return getattr(requests, method.lower())  # what the SDK does with keep-alive off


class PullsThroughAnotherClient(ConsumerClient):
    def __init__(self, endpoint, access_key_id, access_key, *args, **kwargs):
        super().__init__(endpoint, access_key_id, access_key, *args, **kwargs)
        self.puller = LogClient(endpoint, access_key_id, access_key)

    def pull_logs(self, shard_id, cursor, end_cursor=None, count=1000, query=None, processor=None):
        return self.puller.pull_logs(self.mproject, self.mlogstore, shard_id, cursor, count)


CANARIES = {  # (canary, the real SDK class, its broken stand-in)
    "preprocessor": (canary_preprocessor, ShardConsumerWorker, IgnoresThePreprocessor),
    "checkpoint_tracker": (canary_checkpoint_tracker, ShardConsumerWorker, HandsProcessACopyOfItsTracker),
    "raw body": (canary_raw_body, PullLogResponse, ParsesAtOnce),
    "clean_shard_consumer": (canary_clean_shard_consumer, ConsumerWorker, LoopWithoutCleanup),
    "data_fetch_interval": (canary_fetch_interval, ConsumerWorker, KeepsItsFirstInterval),
    "max_fetch_log_group_size": (canary_max_fetch_groups, ShardConsumerWorker, KeepsItsFirstCount),
    "worker attributes": (canary_worker_attributes, ConsumerWorker, FreshClientPerShard),
    "worker __init__": (canary_worker_init, ConsumerWorker, SetsMore),
    "mclient": (canary_mclient, ConsumerClient, HeartbeatsWithItsFirstClient),
    "heartbeat lists": (canary_heartbeat_lists, ConsumerHeatBeat, LocksSomethingElse),
    "remove_heart_shard": (canary_remove_heart_shard, ConsumerHeatBeat, RenamedLists),
    "heartbeat answered": (canary_heartbeat_answered, ConsumerHeatBeat, LocksSomethingElse),
    "heartbeat client": (canary_heartbeat_client, ConsumerHeatBeat, AsksSlsItself),
    "tracker": (canary_tracker, ConsumerCheckpointTracker, FlushesWithoutTheLock),
    "shut_down_flag": (canary_shut_down_flag, ConsumerWorker, IgnoresShutDownFlag),
    "shard_id": (canary_shard_id, Probe, ForgetsItsShard),
    "session": (canary_session, LogClient, SessionPerRequest),
    "pulls through mclient": (canary_pulls_through_mclient, ConsumerClient, PullsThroughAnotherClient),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CANARIES)
def test_the_sdk_still_uses_it(name, emulator):
    canary, sdk_class, _ = CANARIES[name]
    ok, saw = canary(emulator, sdk_class)
    assert ok, f"the SDK no longer does what the forwarder relies on ({name}): {saw}"


@pytest.mark.slow
@pytest.mark.parametrize("name", CANARIES)
def test_the_canary_fails_against_a_broken_stand_in(name, emulator):
    canary, _, stand_in = CANARIES[name]
    ok, saw = canary(emulator, stand_in)
    assert not ok, f"the {name} canary did not notice {stand_in.__name__}: {saw}"


def test_every_internal_has_a_canary():
    """Every class sdk_internals() names is watched by a canary above."""
    watched = {sdk_class for _, sdk_class, _ in CANARIES.values()} | {ConsumerProcessorBase}
    assert {owner for _, owner, _, _ in fwd.sdk_internals()} <= watched


# ------------------------------------------------------------------------------------------------
# The start-up check
# ------------------------------------------------------------------------------------------------

def test_the_installed_sdk_passes_the_start_up_check():
    assert fwd.check_sdk() is None
    assert fwd.SDK_VERSION == fwd.SDK_TESTED_VERSION
    pinned = (SCRIPT.parent / "requirements.txt").read_text()
    assert re.search(rf"^aliyun-log-python-sdk=={re.escape(fwd.SDK_TESTED_VERSION)}\b", pinned, re.M)


@pytest.mark.parametrize("index", range(len(fwd.sdk_internals())))
def test_removing_any_internal_fails_the_start_up_check(index, monkeypatch):
    what, owner, method, names = fwd.sdk_internals()[index]
    monkeypatch.setattr(owner, method, lambda self, *args, **kwargs: None)
    problem = fwd.check_sdk()
    assert problem and what in problem and f"{owner.__name__}.{method}" in problem
    assert fwd.SDK_TESTED_VERSION in problem and "\n" not in problem


def forwarder_without_sls(python_args, cwd):
    """(exit status, stderr) of the forwarder run with python_args and settings that name no real SLS."""
    env = {"SLS_ENDPOINT": "http://sls.invalid", "SLS_REGION": "cn-hangzhou", "SLS_AK_ID": "id", "SLS_AK_KEY": "s",
           "SLS_PROJECT": "p", "SLS_LOGSTORE": "l", "SYSLOG_HOST": "127.0.0.1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, *python_args], env=env, capture_output=True, text=True,
                            timeout=60, cwd=cwd)
    return result.returncode, result.stderr


def test_a_changed_sdk_stops_the_forwarder_with_one_line(tmp_path):
    status, stderr = forwarder_without_sls(with_fault("sdk_without", "ConsumerWorker", "run"), tmp_path)
    assert status == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "ConsumerWorker.run" in lines[0] and fwd.SDK_TESTED_VERSION in lines[0]


def test_a_missing_sdk_is_one_line_and_exit_1(tmp_path):
    code = ("import sys; sys.modules['aliyun'] = None\n"
            f"sys.path.insert(0, {str(SCRIPT.parent)!r}); import sync_waf_to_syslog as fwd\n"
            "sys.exit(fwd.main([]))\n")
    status, stderr = forwarder_without_sls(["-c", code], tmp_path)
    assert status == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "aliyun-log-python-sdk==" in lines[0] and "Traceback" not in stderr
