"""What reached a syslog peer: waiting for every log and accounting for loss and duplicates."""
import datetime
import re

from tests.kv import parse_kv
from tests.polling import poll
from tests.syslog_receiver import loss_report
from tests.waf_logs import expected_fields


def trace_ids(logs):
    return [entry["request_traceid"] for entry in logs]


def wait_delivered(messages, expected_ids, timeout=60):
    """Poll messages() (what arrived, as bytes) until every id in expected_ids is there (duplicates do
    not count) or timeout; the loss_report of the last poll, for the caller to judge."""
    return poll(lambda: loss_report(expected_ids, messages()), lambda report: report["lost"] == 0,
                timeout, interval=0.2)


def assert_delivered(messages, expected_ids, forwarders=(), timeout=60):
    """wait_delivered, failing with the forwarders' logs if an id is still missing."""
    report = wait_delivered(messages, expected_ids, timeout)
    if report["lost"]:
        logs = "\n".join(f.stderr()[-2500:] for f in forwarders)
        raise AssertionError(f"{report['lost']} of {report['sent']} logs not delivered within {timeout} s; "
                             f"forwarder log:\n{logs}")
    return report


def assert_delivered_exactly(records, logs, hostname, separator=","):
    """rsyslog records (kv messages) hold every log exactly once, with its fields, host and time."""
    by_id = {}
    for record in records:
        fields = parse_kv(record["msg"], separator)
        by_id.setdefault(dict(fields)["request_traceid"], []).append((record, fields))
    assert sorted(by_id) == sorted(trace_ids(logs))
    for entry in logs:
        [(record, fields)] = by_id[entry["request_traceid"]]
        assert fields == expected_fields(entry)
        assert record["hostname"] == hostname
        assert datetime.datetime.fromisoformat(record["timestamp"]).timestamp() == int(entry["__time__"])


def final_stats(forwarder):
    """(send errors, messages resent) from the forwarder's last statistics line, at exit."""
    counts = re.findall(r"send errors (\d+), resent (\d+)", forwarder.stderr())
    assert counts, f"no statistics line in the forwarder's log:\n{forwarder.stderr()[-2000:]}"
    return int(counts[-1][0]), int(counts[-1][1])


def account(fault, sent_ids, messages, forwarder):
    """Loss accounting for one fault: print the table row and return the loss_report."""
    report = loss_report(sent_ids, messages)
    send_errors, resent = final_stats(forwarder)
    report.update(send_errors=send_errors, resent=resent)
    print(f"\nFAULT {fault}: sent={report['sent']} received={report['received']} "
          f"lost={report['lost']} duplicates={report['duplicates']} "
          f"send_errors={send_errors} resent={resent} lost_ids={report['lost_ids']}")
    return report
