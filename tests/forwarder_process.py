"""Runs the real forwarder, `python sync_waf_to_syslog.py`, as a subprocess for tests."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "sync_waf_to_syslog.py"

# Variables of the host environment that must not leak into a forwarder under test.
_DROPPED_PREFIXES = ("SLS_", "SYSLOG_", "SYNC_")


def forwarder_env(emulator, *, host="127.0.0.1", port, protocol="tcp", **settings):
    """A complete environment: the emulator's proxy variables, fast SDK timings and the given
    settings (keyword names are the variable names, e.g. SYSLOG_SEP="|")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_PREFIXES)}
    env.update(emulator.client_env())
    env.update({
        "SLS_ENDPOINT": emulator.endpoint, "SLS_AK_ID": emulator.access_key_id,
        "SLS_AK_KEY": emulator.access_key_secret, "SLS_PROJECT": emulator.project,
        "SLS_LOGSTORE": emulator.logstore, "SLS_REGION": "cn-hangzhou", "SLS_CG": "test-group",
        "SLS_CONSUMER_NAME": "test-consumer", "SLS_HEARTBEAT_INTERVAL": "1",
        "SLS_FETCH_INTERVAL": "0.1", "SYSLOG_HOST": host, "SYSLOG_PORT": str(port),
        "SYSLOG_PROTOCOL": protocol, "SYSLOG_RETRY_MAX_DELAY": "1", "SYNC_STATS_INTERVAL": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in settings.items()})
    return env


class ForwarderProcess:
    """`with ForwarderProcess(env, workdir) as fwd:` starts the forwarder; leaving stops it."""

    def __init__(self, env, workdir, args=(), python_args=None):
        """`python_args` replaces the script path, e.g. ["-c", code] to run it in a changed
        interpreter; `args` are the forwarder's own arguments."""
        self.env = dict(env)
        self.env.setdefault("SYNC_LOCK_FILE", str(Path(workdir) / f"lock-{self.env['SLS_CONSUMER_NAME']}"))
        self.workdir = Path(workdir)
        self.args = list(args)
        self.python_args = list(python_args or [str(SCRIPT)])
        self.process = None
        self.stdout_path = self.workdir / f"forwarder-{id(self)}.out"
        self.stderr_path = self.workdir / f"forwarder-{id(self)}.err"

    def start(self):
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen([sys.executable, *self.python_args, *self.args], env=self.env,
                                            stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            cwd=self.workdir)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout=30):
        """SIGTERM, then the exit status (killing it and failing if it does not exit in time)."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        self.process.kill()
        return self.process.wait()

    def wait(self, timeout=60):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"forwarder did not exit within {timeout} s; log:\n{self.stderr()[-3000:]}")

    def stdout(self):
        return self.stdout_path.read_text(errors="replace")

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def wait_for_log(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the forwarder's log:\n{self.stderr()[-3000:]}")


def problem_lines(log_text):
    """The warnings and errors of a forwarder's log, but the one at start about the emulator's
    plain-HTTP endpoint."""
    return [line for line in log_text.splitlines()
            if (" WARNING " in line or " ERROR " in line) and "is plain HTTP" not in line]


def with_fault(name, *args):
    """python_args for ForwarderProcess: the forwarder with the change tests/injected_faults.py's
    `name`(fwd, *args) makes to it (or to the interpreter), then its main()."""
    return ["-c", f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
                  "import sync_waf_to_syslog as fwd, tests.injected_faults as faults\n"
                  f"faults.{name}(fwd, *{args!r})\nsys.exit(fwd.main())\n"]


def run_forwarder(env, workdir, args=(), timeout=60, python_args=None):
    """Run to completion: (exit status, stdout, stderr)."""
    fwd = ForwarderProcess(env, workdir, args, python_args).start()
    status = fwd.wait(timeout)
    return status, fwd.stdout(), fwd.stderr()


def free_port(kind=socket.SOCK_STREAM):
    """A port on 127.0.0.1 where nothing listens now (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
