"""Shared fixtures: test certificates, a real rsyslogd, the SLS emulator, realistic WAF data."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the forwarder is one file at the top, imported as a module

from tests.pki import make_pki  # noqa: E402
from tests.rsyslog_peer import Rsyslog  # noqa: E402
from tests.sls_emulator import EmulatorProcess  # noqa: E402
from tests.waf_logs import hostile_logs, realistic_logs, write_jsonl  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the forwarder, a consumer group or rsyslogd for real "
                                       "(seconds each); the quick check leaves these out")
    config.addinivalue_line("markers", "rsyslog: needs a real rsyslogd (apt-get install rsyslog "
                                       "rsyslog-gnutls rsyslog-openssl rsyslog-relp)")


def pytest_collection_modifyitems(items):
    """Tests that use the shared rsyslogd are marked rsyslog and slow by that alone."""
    for item in items:
        if "rsyslog" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.rsyslog)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def rsyslog(tmp_path_factory, pki):
    """One rsyslogd for the session; tests tell their messages apart by SYSLOG_TAG (app-name)."""
    with Rsyslog(tmp_path_factory.mktemp("rsyslog"), pki) as peer:
        yield peer


@pytest.fixture
def waf_data(tmp_path):
    """(logs, path of their JSONL file): 300 realistic WAF logs and every hostile one."""
    logs = realistic_logs(300, seed=7) + hostile_logs()
    return logs, write_jsonl(tmp_path / "waf.jsonl", logs)


@pytest.fixture
def make_emulator():
    """Factory for SLS emulators (subprocesses); every one is stopped after the test."""
    started = []

    def make(load=(), shards=2, **kwargs):
        emulator = EmulatorProcess(shards=shards, load=[str(p) for p in load], **kwargs)
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()
