"""The local playground (tests/playground.py), from a clean copy of the repository: it writes
.env.playground, and the real CLI runs --check, --dry-run and a real run against it with nothing
but that file (the proxy to the emulator comes from the file too)."""
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from tests.forwarder_process import SCRIPT
from tests.polling import wait_until

pytestmark = pytest.mark.slow
ROOT = SCRIPT.parent
LOGS = 100


def clean_copy(destination):
    """What a clone holds: the tracked files and the new ones not ignored (no .env, no caches)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def test_the_playground_works_from_a_clean_copy(tmp_path):
    clone = clean_copy(tmp_path / "clone")
    assert not (clone / ".env").exists() and not (clone / ".env.playground").exists()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLS_", "SYSLOG_", "SYNC_")) and k.upper() not in ("HTTP_PROXY", "NO_PROXY")}
    env["TMPDIR"] = str(tmp_path)  # the forwarder's lock file and the playground's data go here
    out_path = tmp_path / "playground.out"
    with open(out_path, "w") as out:
        playground = subprocess.Popen([sys.executable, "tests/playground.py", "--logs", str(LOGS),
                                       "--per-second", "2", "--syslog-port", "0"], cwd=clone, env=env,
                                      stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: "playground ready" in out_path.read_text() or playground.poll() is not None,
                   "the playground", 60)
        env_file = clone / ".env.playground"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600, out_path.read_text()
        assert "HTTP_PROXY=http://127.0.0.1:" in env_file.read_text()

        def cli(*args, timeout=60):
            return subprocess.run([sys.executable, "sync_waf_to_syslog.py", "--env-file", ".env.playground", *args],
                                  cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)

        check = cli("--check")
        assert check.returncode == 0 and check.stdout.count("OK   ") == 3, check.stdout + check.stderr  # credentials, SLS, syslog
        dry = cli("--dry-run")
        assert dry.returncode == 0 and len(dry.stdout.splitlines()) >= LOGS, dry.stderr

        with open(tmp_path / "forwarder.err", "w") as err:
            forwarder = subprocess.Popen([sys.executable, "sync_waf_to_syslog.py", "--env-file", ".env.playground"],
                                         cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                         stdin=subprocess.DEVNULL)
        try:
            def received():
                counts = re.findall(r"syslog receiver: (\d+) messages received", out_path.read_text())
                return counts and int(counts[-1]) >= LOGS
            wait_until(received, f"the playground's receiver to get {LOGS} messages", 60)
            forwarder.send_signal(signal.SIGTERM)
            assert forwarder.wait(30) == 0
        finally:
            if forwarder.poll() is None:
                forwarder.kill()
                forwarder.wait()
        playground.send_signal(signal.SIGINT)  # Ctrl-C
        assert playground.wait(30) == 0, out_path.read_text()
    finally:
        if playground.poll() is None:
            playground.kill()
            playground.wait()
    assert "playground stopped" in out_path.read_text()
    assert not env_file.exists()
