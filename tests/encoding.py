"""Encoding in tests: settings from a few variables, and the messages the forwarder's encoder makes."""
import re

import sync_waf_to_syslog as fwd
from tests.waf_logs import pull_body

RFC5424 = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (.*)\Z", re.S)
BASE_ENV = dict(SLS_ENDPOINT="sls.example.test", SLS_REGION="cn-hangzhou", SLS_AK_ID="id", SLS_AK_KEY="secret",
                SLS_PROJECT="p", SLS_LOGSTORE="l", SYSLOG_HOST="syslog.example.test")


def make_settings(**env):
    """Settings from BASE_ENV and the given variables (keyword names are the variable names)."""
    return fwd.Settings.from_environment({**BASE_ENV, **env})


def encode(logs, **env):
    """fwd.Encoded for logs (dicts, tests/waf_logs.py) as one pull, with settings from env."""
    return fwd.MessageEncoder(make_settings(**env), procid=4242).encode(fwd.read_log_groups(pull_body(logs)))


def msg_of(message):
    """The MSG part of an RFC 5424 message (bytes), as text."""
    return RFC5424.match(message).group(8).decode("utf-8")


def bodies(logs, **env):
    """The MSG of each log's message, as text."""
    return [msg_of(message) for message in encode(logs, **env).messages]
