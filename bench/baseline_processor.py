"""The benchmark's baseline: the SDK's own path, as Alibaba's "sync data to syslog" sample uses it.

Alibaba's WAF-to-syslog guide points to the SDK sample
`tests/consumer_group_examples/sync_data_to_syslog.py`; this is its processor, kept as it is
where it costs time: a `ConsumerWorker` whose processor flattens every batch with
`PullLogResponse.loggroups_to_flattern_list`, writes ``{sep}key=value`` for every field into a
StringIO, and sends each log with the SDK's `SyslogClientRFC5424`, connected once per batch
(newline-framed over TCP, one datagram per log over UDP). Like the sample it has no retry: the
SDK client drops a message it cannot send.

Run by bench/throughput.py as a program, configured by the forwarder's own variables, so both
read the same emulator with the same SDK settings:

    SLS_ENDPOINT SLS_AK_ID SLS_AK_KEY SLS_PROJECT SLS_LOGSTORE SLS_CG SLS_CONSUMER_NAME
    SLS_HEARTBEAT_INTERVAL SLS_FETCH_INTERVAL SLS_MAX_FETCH_GROUPS SLS_WORKER_POOL_SIZE
    SYSLOG_HOST SYSLOG_PORT SYSLOG_PROTOCOL (tcp|udp) SYSLOG_SEP SYSLOG_TAG SYSLOG_HOSTNAME

It consumes from the beginning of the logstore until SIGTERM or SIGINT, then exits 0.
"""
import io
import logging
import os
import signal
import sys
import time
from datetime import datetime

from aliyun.log.consumer import ConsumerProcessorBase, ConsumerWorker, CursorPosition, LogHubConfig
from aliyun.log.ext.syslogclient import SyslogClientRFC5424
from aliyun.log.pulllog_response import PullLogResponse

log = logging.getLogger("baseline")


def format_log(log_dict, separator):
    """The sample's message body: ``{sep}key=value`` per field, __time__ removed (it is the
    header's timestamp)."""
    body = io.StringIO()
    for key, value in log_dict.items():
        body.write("{0}{1}={2}".format(separator, key, value))
    return body.getvalue()


def format_batch(log_groups, separator):
    """(timestamp, body) for every log of a batch, as the sample's process() computes them."""
    formatted = []
    for entry in PullLogResponse.loggroups_to_flattern_list(log_groups, time_as_str=True, decode_bytes=True):
        timestamp = datetime.fromtimestamp(int(entry["__time__"]))
        del entry["__time__"]
        formatted.append((timestamp, format_log(entry, separator)))
    return formatted


class SampleSyslogProcessor(ConsumerProcessorBase):
    """The sample's `SyncData` processor."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def process(self, log_groups, check_point_tracker):
        target = self.target
        batch = format_batch(log_groups, target["sep"])
        log.info("Get data from shard %s, log count: %s", self.shard_id, len(batch))
        with SyslogClientRFC5424(target["host"], target["port"], proto=target["protocol"]) as client:
            for timestamp, body in batch:
                client.log(body, timestamp=timestamp, program=target["tag"], hostname=target["hostname"])
        log.info("Complete send data to remote")
        self.save_checkpoint(check_point_tracker)


def config_from_environment(env):
    """(LogHubConfig, syslog target) from the forwarder's variables (defaults as the forwarder's)."""
    group = env.get("SLS_CG", "WAF-SLS")
    config = LogHubConfig(
        env["SLS_ENDPOINT"], env["SLS_AK_ID"], env["SLS_AK_KEY"], env["SLS_PROJECT"], env["SLS_LOGSTORE"],
        group, env.get("SLS_CONSUMER_NAME", f"{group}-baseline"),
        cursor_position=CursorPosition.BEGIN_CURSOR,
        heartbeat_interval=int(env.get("SLS_HEARTBEAT_INTERVAL", "20")),
        data_fetch_interval=float(env.get("SLS_FETCH_INTERVAL", "1")),
        max_fetch_log_group_size=int(env.get("SLS_MAX_FETCH_GROUPS", "1000")),
        worker_pool_size=int(env.get("SLS_WORKER_POOL_SIZE", "2")))
    target = {
        "host": env["SYSLOG_HOST"], "port": int(env.get("SYSLOG_PORT", "514")),
        "protocol": env.get("SYSLOG_PROTOCOL", "tcp"), "sep": env.get("SYSLOG_SEP", ","),
        "tag": env.get("SYSLOG_TAG") or None, "hostname": env.get("SYSLOG_HOSTNAME") or None,
    }
    return config, target


def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config, target = config_from_environment(os.environ)
    stop = []  # not an Event: a handler calling Event.set() can deadlock on the Event's lock
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: stop.append(number))
    worker = ConsumerWorker(SampleSyslogProcessor, config, args=(target,))
    worker.start()
    while not stop:
        time.sleep(0.1)
    worker.shutdown()
    worker.join(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
