"""Driving an in-process SLS emulator with the unmodified SDK: its settings, puts, pulls, and consumer
workers that record what they receive."""
import contextlib

from aliyun.log import LogItem, PutLogsRequest
from aliyun.log.consumer import ConsumerProcessorBase, ConsumerWorker, CursorPosition, LogHubConfig

from tests.sls_emulator import SlsEmulator

PROJECT, LOGSTORE = "waf-project", "waf-logstore"
AKID, SECRET = "test-akid", "test-secret"


@contextlib.contextmanager
def emulator_for_sdk(monkeypatch, shards, group_size=100):
    """An in-process emulator, with the proxy settings that send the SDK's requests to it."""
    with SlsEmulator(PROJECT, LOGSTORE, shards, AKID, SECRET, group_size=group_size) as emulator:
        for name, value in emulator.client_env().items():
            monkeypatch.setenv(name, value)
        yield emulator


def put(client, logs, **request_options):
    """One SDK put_logs call (one LogGroup) with the logs' content fields."""
    items = []
    for log in logs:
        item = LogItem(timestamp=int(log["__time__"]))
        for key, value in log.items():
            if not key.startswith("__"):
                item.push_back(key, value)  # LogItem(contents=...) deep-copies: 20x slower
        items.append(item)
    client.put_logs(PutLogsRequest(PROJECT, LOGSTORE, "waf_access_log", "192.0.2.1", items,
                                   logtags=[("batch", logs[0]["request_traceid"])], **request_options))


def content(log, key):
    return next(c.Value for c in log.Contents if c.Key == key)


def pulled_logs(response):
    return [log for group in response.get_loggroup_list().LogGroups for log in group.Logs]


def traceid_consumer_shard(log, consumer_name, shard_id):
    return content(log, "request_traceid"), consumer_name, shard_id


class RecordingProcessor(ConsumerProcessorBase):
    """Appends record(log, consumer name, shard) to `seen` for every log (by default its
    request_traceid, consumer and shard) and persists the checkpoint after every batch, so that the
    stored checkpoint is exact whenever a shard changes hands."""

    def __init__(self, consumer_name, seen, record=traceid_consumer_shard):
        super().__init__()
        self.consumer_name, self.seen, self.record = consumer_name, seen, record

    def process(self, log_group_list, check_point_tracker):
        for group in log_group_list.LogGroups:
            for log in group.Logs:
                self.seen.append(self.record(log, self.consumer_name, self.shard_id))
        self.save_checkpoint(check_point_tracker, force=True)


def start_worker(emulator, name, seen, group="forwarder", record=traceid_consumer_shard, **options):
    """A started ConsumerWorker of `group` recording into `seen`; options go to LogHubConfig
    (in_order, query, processor, ...)."""
    option = LogHubConfig(emulator.endpoint, AKID, SECRET, PROJECT, LOGSTORE, group, name,
                          cursor_position=CursorPosition.BEGIN_CURSOR, heartbeat_interval=1,
                          data_fetch_interval=0.1, max_fetch_log_group_size=5, **options)
    worker = ConsumerWorker(RecordingProcessor, option, args=(name, seen, record))
    worker.start()
    return worker


def stop_worker(worker):
    worker.shutdown()
    worker.join(timeout=60)
    assert not worker.is_alive()
