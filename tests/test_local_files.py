"""The files the forwarder writes or trusts, against other local users (issue 18): the lock file
(also with --workers), SYNC_LOG_FILE, .env and the TLS files. A planted symbolic link, hard link or
foreign file is refused with one line (lock: exit 1; settings: exit 2) and left unchanged; a lock
another user could hold is never "another instance" with exit 0. Run as root, and as the
unprivileged user nobody where this machine allows it."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import sync_waf_to_syslog as fwd
from tests.forwarder_process import SCRIPT, ForwarderProcess, forwarder_env
from tests.syslog_receiver import SyslogReceiver

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the tests chown files to "
                                                          "another user (nobody)")
SECRET = "root's secret\n"
SETTINGS = dict(SLS_ENDPOINT="sls.example.test", SLS_REGION="cn-hangzhou", SLS_AK_ID="id", SLS_AK_KEY="key",
                SLS_PROJECT="waf-project", SLS_LOGSTORE="waf-logstore", SYSLOG_HOST="127.0.0.1")


def victim(directory):
    """A private file of root's that a planted link points at."""
    path = Path(directory) / "victim"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


def forwarder_main(args, monkeypatch, capsys, **variables):
    """main(args) in this process with exactly these settings: (status, stdout, stderr). Only for
    paths that end before logging is set up (settings errors)."""
    for name in os.environ:
        if name.startswith(("SLS_", "SYSLOG_", "SYNC_")):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    status = fwd.main(args)
    out, err = capsys.readouterr()
    return status, out, err


def run_main(tmp_path, **variables):
    """The forwarder run to completion with these settings: (status, stderr lines)."""
    env = {"PATH": os.environ["PATH"], **SETTINGS, **variables}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    return result.returncode, result.stderr.splitlines()


# ------------------------------------------------------------------------------------------------
# The lock file
# ------------------------------------------------------------------------------------------------

def test_the_default_lock_is_in_a_private_directory():
    runtime = fwd.default_lock_file({"RUNTIME_DIRECTORY": "/run/sync:/run/other"}, "WAF-SLS-h/x")
    assert runtime == "/run/sync/sync_waf_to_syslog-WAF-SLS-h_x.lock"
    if os.geteuid() == 0:
        assert fwd.default_lock_file({}, "c") == "/run/sync_waf_to_syslog/sync_waf_to_syslog-c.lock"
    assert not fwd.Settings.from_environment(SETTINGS).sync_lock_file.startswith(tempfile.gettempdir())


def test_a_lock_of_this_user_works_and_tells_the_next_one_its_pid(tmp_path):
    path = tmp_path / "private" / "x.lock"  # its directory is created, 0700
    handle, holder = fwd.acquire_lock(str(path))
    assert holder is None and path.read_text() == f"{os.getpid()}\n"
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert fwd.acquire_lock(str(path)) == (None, str(os.getpid()))
    handle.close()
    old = tmp_path / "old.lock"  # as older versions made it
    old.write_text("123\n")
    old.chmod(0o644)
    handle, holder = fwd.acquire_lock(str(old))
    assert holder is None and old.stat().st_mode & 0o777 == 0o600
    old.chmod(0o644)
    with pytest.raises(fwd.LockError, match="readable by others"):  # held: by anyone, maybe
        fwd.acquire_lock(str(old))
    handle.close()


@needs_root
def test_a_lock_another_user_could_plant_or_hold_is_refused_and_left_alone(tmp_path):
    target = victim(tmp_path)
    planted = {
        "symbolic link": lambda path: path.symlink_to(target),
        "hard links": lambda path: os.link(target, path),
        "not a regular file": lambda path: os.mkfifo(path),
        f"belongs to uid {NOBODY}": lambda path: (path.write_text("1 \x1b[2Jforged\n"),
                                                  os.chown(path, NOBODY, NOBODY)),
        "writable by group or others": lambda path: (path.write_text("1\n"), path.chmod(0o666)),
    }
    for problem, plant in planted.items():
        path = tmp_path / f"{problem}.lock"
        plant(path)
        before = path.read_text() if path.is_file() else None
        held = open(path, "rb") if path.is_file() else None  # another user's process holding it
        if held:
            fwd.fcntl.flock(held, fwd.fcntl.LOCK_EX)
        with pytest.raises(fwd.LockError, match=problem):
            fwd.acquire_lock(str(path))
        if held:
            held.close()
        assert (path.read_text() if path.is_file() else None) == before, problem
    assert target.read_text() == SECRET


@needs_root
def test_a_lock_in_a_directory_others_can_change_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # others could remove the lock while it is held, and a second copy start
    with pytest.raises(fwd.LockError, match="others can remove or replace it"):
        fwd.acquire_lock(str(shared / "x.lock"))
    shared.chmod(0o1777)  # sticky, like /tmp: only the owner removes its files
    handle, holder = fwd.acquire_lock(str(shared / "x.lock"))
    assert holder is None
    handle.close()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(fwd.LockError, match=f"belongs to uid {NOBODY}"):
        fwd.acquire_lock(str(foreign / "x.lock"))


@pytest.mark.slow
@needs_root
def test_an_untrusted_lock_is_exit_1_with_one_line_never_another_instance(tmp_path):
    target = victim(tmp_path)
    link = tmp_path / "link.lock"
    link.symlink_to(target)
    status, lines = run_main(tmp_path, SYNC_LOCK_FILE=str(link))
    assert status == 1 and len(lines) == 1 and "symbolic link" in lines[0], lines
    assert target.read_text() == SECRET
    foreign = tmp_path / "foreign.lock"
    foreign.write_text("4242 \x1b[2J\n")
    os.chown(foreign, NOBODY, NOBODY)
    with open(foreign, "rb") as held:  # its owner holds it, as the attack did
        fwd.fcntl.flock(held, fwd.fcntl.LOCK_EX)
        status, lines = run_main(tmp_path, SYNC_LOCK_FILE=str(foreign))
    assert status == 1 and len(lines) == 1 and f"belongs to uid {NOBODY}" in lines[0], lines
    assert "another instance" not in lines[0] and "\x1b" not in lines[0]
    assert foreign.read_text() == "4242 \x1b[2J\n"


def python_for_nobody():
    """An interpreter the user nobody can run (this one may live under /root), or None."""
    for python in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        try:
            if python and subprocess.run([python, "-c", "pass"], preexec_fn=become_nobody,
                                         capture_output=True, timeout=30).returncode == 0:
                return python
        except OSError:  # nobody may not run it at all
            continue
    return None


def become_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


NOBODY_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sync_waf_to_syslog as fwd
results = {"default": fwd.default_lock_file({}, "c")}
for name in sys.argv[3:]:
    try:
        handle, holder = fwd.acquire_lock(sys.argv[2] + "/" + name)
        results[name] = "acquired" if holder is None else "held by " + holder
    except fwd.LockError as exc:
        results[name] = str(exc)
print(json.dumps(results))
"""


@pytest.mark.slow
@needs_root
def test_as_an_unprivileged_user_a_planted_lock_is_refused_too():
    python = python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that the user nobody may run")
    shared = Path(tempfile.mkdtemp(prefix="lock-test-", dir="/tmp"))  # reachable for nobody
    try:
        shared.chmod(0o1777)
        target = victim(shared)
        (shared / "link.lock").symlink_to(target)
        (shared / "root.lock").write_text("1\n")
        (shared / "writable.lock").write_text("1\n")
        (shared / "writable.lock").chmod(0o666)
        # A copy of the forwarder nobody can read (the checkout may sit in a private directory).
        code = shared / "code"
        code.mkdir(mode=0o755)
        shutil.copy(SCRIPT, code)
        result = subprocess.run([python, "-c", NOBODY_SCRIPT, str(code), str(shared), "link.lock",
                                 "root.lock", "writable.lock", "own.lock"],
                                preexec_fn=become_nobody, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout)
        assert found["default"] == str(code / "sync_waf_to_syslog-c.lock")  # beside the script
        assert "symbolic link" in found["link.lock"] and "Permission denied" in found["root.lock"]
        assert "belongs to uid 0" in found["writable.lock"] and found["own.lock"] == "acquired"
        assert target.read_text() == SECRET and (shared / "root.lock").read_text() == "1\n"
        assert (shared / "own.lock").stat().st_uid == NOBODY
    finally:
        shutil.rmtree(shared)


@pytest.mark.slow
@needs_root
def test_a_worker_whose_lock_is_planted_refuses_it(make_emulator, tmp_path):
    target = victim(tmp_path)
    lock = tmp_path / "workers.lock"
    (tmp_path / "workers.lock.test-consumer-1").symlink_to(target)  # the second worker's lock
    emulator = make_emulator()
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_LOCK_FILE=lock)
        with ForwarderProcess(env, tmp_path, ["--workers", "2"]) as supervisor:
            supervisor.wait_for_log("worker test-consumer-1 exited with status 1")
            assert supervisor.stop() == 0
    assert "workers.lock.test-consumer-1 (a symbolic link, not followed)" in supervisor.stderr()
    assert target.read_text() == SECRET


# ------------------------------------------------------------------------------------------------
# SYNC_LOG_FILE
# ------------------------------------------------------------------------------------------------

@needs_root
def test_the_log_file_is_created_private_and_never_through_a_link(tmp_path):
    fresh = tmp_path / "forwarder.log"
    handler = fwd.PrivateLogFile(str(fresh))
    handler.close()
    assert fresh.stat().st_mode & 0o777 == 0o600
    target = victim(tmp_path)
    (tmp_path / "link.log").symlink_to(target)
    os.link(target, tmp_path / "hard.log")
    (tmp_path / "foreign.log").write_text("")
    os.chown(tmp_path / "foreign.log", NOBODY, NOBODY)
    (tmp_path / "writable.log").write_text("")
    (tmp_path / "writable.log").chmod(0o666)
    for name in ("link.log", "hard.log", "foreign.log", "writable.log"):
        with pytest.raises(OSError):
            fwd.PrivateLogFile(str(tmp_path / name))
    assert target.read_text() == SECRET


@pytest.mark.slow
def test_a_log_file_that_cannot_be_opened_is_a_setting_error(tmp_path):
    target = victim(tmp_path)
    (tmp_path / "link.log").symlink_to(target)
    status, lines = run_main(tmp_path, SYNC_LOG_FILE=str(tmp_path / "link.log"))
    assert status == 2 and len(lines) == 1 and lines[0].startswith("setting error: SYNC_LOG_FILE:"), lines
    assert target.read_text() == SECRET


# ------------------------------------------------------------------------------------------------
# .env and the TLS files
# ------------------------------------------------------------------------------------------------

@needs_root
def test_an_env_file_others_could_change_is_not_read(tmp_path, monkeypatch, capsys):
    env_file = tmp_path / "forwarder.env"
    env_file.write_text("SYSLOG_FACILITY=bogus\n")  # read, this would be a problem of its own
    env_file.chmod(0o600)
    status, _, err = forwarder_main(["--env-file", str(env_file)], monkeypatch, capsys, **SETTINGS)
    assert status == 2 and "SYSLOG_FACILITY" in err  # a file of ours, 0600: read
    env_file.chmod(0o666)
    link = tmp_path / "link.env"
    link.symlink_to(env_file)
    for path, problem in ((env_file, "writable by group or others"), (link, "writable by group or others")):
        status, _, err = forwarder_main(["--env-file", str(path)], monkeypatch, capsys, **SETTINGS)
        assert status == 2 and err.count("\n") == 1 and problem in err and "SYSLOG_FACILITY" not in err, err
    env_file.chmod(0o600)
    os.chown(env_file, NOBODY, NOBODY)
    status, _, err = forwarder_main(["--env-file", str(env_file)], monkeypatch, capsys, **SETTINGS)
    assert status == 2 and f"belongs to uid {NOBODY}" in err and "SYSLOG_FACILITY" not in err, err
    os.chown(env_file, 0, 0)
    os.lchown(link, NOBODY, NOBODY)  # a link another user planted, to a good file
    status, _, err = forwarder_main(["--env-file", str(link)], monkeypatch, capsys, **SETTINGS)
    assert status == 2 and f"symbolic link of uid {NOBODY}" in err, err


@needs_root
def test_tls_files_others_could_change_are_setting_errors(tmp_path):
    key = tmp_path / "client.key"
    key.write_text("not a key\n")
    key.chmod(0o666)
    settings = dict(SETTINGS, SYSLOG_PROTOCOL="tls", SYSLOG_CLIENT_CERT=str(key), SYSLOG_CLIENT_KEY=str(key),
                    SYSLOG_CERT_PATH=str(key))
    with pytest.raises(fwd.SettingsError) as error:
        fwd.Settings.from_environment(settings)
    problems = error.value.problems
    assert [problem.split(":")[0] for problem in problems] == \
        ["SYSLOG_CLIENT_CERT", "SYSLOG_CLIENT_KEY", "SYSLOG_CERT_PATH"], problems
    assert all("writable by group or others" in problem for problem in problems)
    key.chmod(0o644)
    os.chown(key, NOBODY, NOBODY)
    with pytest.raises(fwd.SettingsError, match=f"belongs to uid {NOBODY}"):
        fwd.Settings.from_environment(settings)
