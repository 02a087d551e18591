"""SLS credentials: the ECS instance's RAM role (rotating STS credentials from the metadata
service), key files read again when they change, a static STS token that expires, and the v4
signature. The forwarder runs as a subprocess against the SLS emulator, which accepts each
temporary credential until its expiration, and tests/ecs_metadata.py, which mints them."""
import os
import re
import threading
import time

import pytest
from aliyun.log import LogException

import sync_waf_to_syslog as fwd
from tests.delivered import trace_ids, wait_delivered
from tests.ecs_metadata import EcsMetadataServer
from tests.forwarder_process import ForwarderProcess, forwarder_env, run_forwarder
from tests.polling import wait_until
from tests.syslog_receiver import SyslogReceiver
from tests.waf_logs import realistic_logs

ROLE = "sls-forwarder-role"
# Credentials live 10 s and a new one is minted every 4 s: each served one is still valid for 6 s at
# least. The forwarder fetches again when half the remaining lifetime has passed, so a process goes
# through a new AccessKey about every 5 s, each still valid for 3 s or more when it is replaced.
LIFETIME, PERIOD = 10, 4
# While the metadata service is down: credentials in use stay valid for 6 s at least, 16 s at most.
LONGER_LIFETIME = 16


class RecordingEmulator:
    """Registers the metadata server's credentials with the emulator and keeps their secrets, so a
    test can look for them in the forwarder's output."""

    def __init__(self, emulator):
        self.emulator, self.secrets = emulator, []

    def add_credentials(self, access_key_id, access_key_secret, security_token, expiration):
        self.secrets += [access_key_secret, security_token]
        return self.emulator.add_credentials(access_key_id, access_key_secret, security_token, expiration)


class LogFeeder:
    """Adds a few logs to the emulator every half second, on a thread, until stopped."""

    def __init__(self, emulator):
        self.emulator, self.logs = emulator, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.feed, daemon=True)

    def feed(self):
        batch = 0
        while not self.stopping.wait(0.5):
            logs = realistic_logs(4, seed=batch, start_time=int(time.time()))
            for entry in logs:
                entry["request_traceid"] = f"feed{batch}-{entry['request_traceid']}"
            self.emulator.add_logs(logs)
            self.logs += logs
            batch += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopping.set()
        self.thread.join()


def role_env(emulator, metadata, port, **settings):
    """forwarder_env with the RAM role as the only credentials."""
    return forwarder_env(emulator, port=port, SLS_AK_ID="", SLS_AK_KEY="", SLS_ECS_RAM_ROLE="auto",
                         SLS_ECS_METADATA_ENDPOINT=metadata.endpoint, **settings)


def output_of(forwarder, *files):
    return forwarder.stdout() + forwarder.stderr() + "".join(path.read_text() for path in files)


def assert_no_secret(text, secrets):
    leaked = [secret[:6] + "..." for secret in secrets if secret in text]
    assert not leaked, f"secrets in the output: {leaked}"


def credentials_in_use(log_file):
    """pid -> the AccessKey IDs the log file says that process took, in order."""
    used = {}
    text = log_file.read_text() if log_file.exists() else ""
    for pid, akid in re.findall(r"\[(\d+)\] RAM role \S+: AccessKey (\S+),", text):
        used.setdefault(pid, []).append(akid)
    return used


def each_process_took(log_file, processes, keys):
    used = credentials_in_use(log_file)
    return len(used) == processes and all(len(set(akids)) >= keys for akids in used.values())


# ------------------------------------------------------------------------------------------------
# In this process: the metadata client, key files, what a refusal means

def role_settings(metadata, **env):
    return fwd.Settings.from_environment({
        "SLS_ENDPOINT": "cn-hangzhou-intranet.log.aliyuncs.com", "SLS_PROJECT": "p", "SLS_LOGSTORE": "l",
        "SYSLOG_HOST": "127.0.0.1", "SLS_ECS_RAM_ROLE": "auto",
        "SLS_ECS_METADATA_ENDPOINT": metadata.endpoint, **env})


def open_and_close(settings):
    credentials = fwd.open_credentials(settings)
    credentials.close()
    return credentials


@pytest.mark.parametrize("mode, v1, token_used", [
    ("normal", "on", True), ("token-required", "off", True), ("v1-only", "on", False)])
def test_the_metadata_client_reads_the_role_credentials(mode, v1, token_used, monkeypatch, caplog):
    # An HTTP proxy meant for SLS must not be used: this one does not exist.
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with EcsMetadataServer(role_name=ROLE, lifetime=600, period=300) as metadata:
        metadata.set_mode(mode)
        credentials = open_and_close(role_settings(metadata, SLS_ECS_METADATA_V1=v1))
        state = metadata.state()
    assert [credentials.get_credentials().get_access_key_id()] == state["issued"]
    assert credentials.role == ROLE and ROLE in credentials.describe()
    assert re.fullmatch(r"they expire at \S+ \S+ UTC \(in (9|10) min \d+ s\) and are renewed before",
                        credentials.expiry())
    assert state["requests"] == {"token": 1, "role_name": 1, "credentials": 1}
    assert ("without one (normal mode, IMDSv1)" in caplog.text) != token_used


@pytest.mark.parametrize("mode, v1, problem", [
    ("v1-only", "off", "SLS_ECS_METADATA_V1=off forbids reading without one"),
    ("down", "on", "GET /latest/meta-data/ram/security-credentials/: HTTP 500"),
    ("normal", "on", "no RAM role other-role is attached to this instance"),
])
def test_no_role_credentials_is_one_line_naming_the_setting(mode, v1, problem):
    with EcsMetadataServer(role_name=ROLE) as metadata:
        metadata.set_mode(mode)
        role = "other-role" if "other-role" in problem else "auto"
        with pytest.raises(fwd.CredentialsError) as raised:
            fwd.open_credentials(role_settings(metadata, SLS_ECS_METADATA_V1=v1, SLS_ECS_RAM_ROLE=role))
    message = str(raised.value)
    assert message.startswith("SLS_ECS_RAM_ROLE: ") and problem in message and "\n" not in message


def test_a_metadata_service_too_slow_to_answer_is_a_failing_one(monkeypatch):
    monkeypatch.setattr(fwd.EcsMetadataService, "TIMEOUT", 0.3)
    with EcsMetadataServer(role_name=ROLE) as metadata:
        metadata.set_mode("slow", delay=0.1)
        open_and_close(role_settings(metadata))
        metadata.set_mode("slow", delay=1)
        with pytest.raises(fwd.CredentialsError) as raised:
            fwd.open_credentials(role_settings(metadata, SLS_ECS_METADATA_V1="off"))
    assert re.search(r"no session token \(PUT /latest/api/token: .*timed out\), and SLS_ECS_METADATA_V1=off "
                     "forbids reading without one$", str(raised.value))


def test_a_refusal_by_sls_fetches_role_credentials_again_at_once():
    with EcsMetadataServer(role_name=ROLE, lifetime=600, period=300) as metadata:
        credentials = fwd.open_credentials(role_settings(metadata))
        try:
            credentials.refused(expired_token_refusal())  # too soon after the first fetch: not again
            assert not credentials.wake.is_set()
            credentials.last_fetch -= credentials.REFETCH_ON_REFUSAL
            new = metadata.rotate()
            credentials.refused(expired_token_refusal())
            wait_until(lambda: credentials.get_credentials().get_access_key_id() == new["AccessKeyId"],
                       "the credentials to be fetched again", 10)
        finally:
            credentials.close()


def write_atomically(path, text):
    """What a secret store does: write a new file and rename it over the old one."""
    new = path.with_suffix(".new")
    new.write_text(text + "\n")
    os.replace(new, path)


def test_key_files_are_read_again_when_they_change(tmp_path, caplog):
    key_file, token_file = tmp_path / "key", tmp_path / "token"
    write_atomically(key_file, "secret-1")
    write_atomically(token_file, "token-1")
    settings = fwd.Settings.from_environment({
        "SLS_ENDPOINT": "cn-hangzhou.log.aliyuncs.com", "SLS_PROJECT": "p", "SLS_LOGSTORE": "l",
        "SYSLOG_HOST": "127.0.0.1", "SLS_AK_ID": "STS.first", "SLS_AK_KEY_FILE": str(key_file),
        "SLS_STS_TOKEN_FILE": str(token_file)})
    credentials = fwd.open_credentials(settings)
    credentials.RECHECK_INTERVAL = 0.05  # not to wait a second for each change
    held = credentials.get_credentials
    assert (held().get_access_key_secret(), held().get_security_token()) == ("secret-1", "token-1")
    assert credentials.describe() == "AccessKey STS.first from SLS_AK_ID / SLS_AK_KEY_FILE / SLS_STS_TOKEN_FILE"

    write_atomically(key_file, "secret-2")
    write_atomically(token_file, "token-2")
    wait_until(lambda: held().get_security_token() == "token-2", "the changed files to be read", 10)
    assert held().get_access_key_secret() == "secret-2"

    key_file.write_text("")  # caught while it is rewritten: the credentials read before stay
    wait_until(lambda: held() and "SLS_AK_KEY_FILE: file" in caplog.text, "a warning about the empty file", 10)
    assert held().get_access_key_secret() == "secret-2"
    assert "secret-" not in caplog.text and "token-" not in caplog.text


def expired_token_refusal():
    return LogException("Unauthorized", "The security token you provided has expired.", resp_status=401)


def test_an_expired_static_token_is_final_but_an_expired_key_file_is_waited_for(tmp_path):
    static = fwd.Settings.from_environment({
        "SLS_ENDPOINT": "cn-hangzhou.log.aliyuncs.com", "SLS_PROJECT": "p", "SLS_LOGSTORE": "l",
        "SYSLOG_HOST": "127.0.0.1", "SLS_AK_ID": "STS.id", "SLS_AK_KEY": "S3cret-value",
        "SLS_STS_TOKEN": "T0ken-value"})
    assert not fwd.refuses_credentials(LogException("ReadQuotaExceed", "not about credentials", resp_status=403))
    assert fwd.refuses_credentials(expired_token_refusal())
    credentials = fwd.open_credentials(static)
    credentials.refused(expired_token_refusal())
    assert credentials.failure.startswith("SLS_STS_TOKEN has expired (Unauthorized: The security token")
    assert "S3cret" not in credentials.failure and "T0ken" not in credentials.failure

    token_file = tmp_path / "token"
    write_atomically(token_file, "token")
    from_file = fwd.open_credentials(fwd.dataclasses.replace(static, sls_sts_token="",
                                                             sls_sts_token_file=str(token_file)))
    from_file.refused(expired_token_refusal())
    assert from_file.failure is None


# ------------------------------------------------------------------------------------------------
# The forwarder

@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ram_role_credentials_rotate_while_logs_keep_arriving(workers, make_emulator, tmp_path):
    emulator = make_emulator(shards=2)
    recorder = RecordingEmulator(emulator)
    log_file = tmp_path / "forwarder.log"
    with EcsMetadataServer(recorder, role_name=ROLE, lifetime=LIFETIME, period=PERIOD) as metadata, \
            SyslogReceiver("tcp") as receiver:
        env = role_env(emulator, metadata, receiver.port, SYNC_LOG_FILE=log_file, SYNC_WORKERS=workers)
        with ForwarderProcess(env, tmp_path) as forwarder:
            with LogFeeder(emulator) as feeder:
                # Two AccessKeys replaced in every consumer process, while logs keep arriving.
                wait_until(lambda: each_process_took(log_file, workers, 3),
                           "three AccessKeys in use in each consumer process", 60)
            report = wait_delivered(lambda: receiver.messages, trace_ids(feeder.logs))
            assert forwarder.stop() == 0
        issued = metadata.state()["issued"]
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    state = emulator.state()
    assert state["refusals_by_access_key"] == {} and "Unauthorized" not in state["errors"]
    assert len(state["requests_by_access_key"]) >= 3 and set(state["requests_by_access_key"]) <= set(issued)
    assert list(state["requests_by_signature"]) == ["v4 cn-hangzhou"]
    assert_no_secret(output_of(forwarder, log_file), recorder.secrets)


@pytest.mark.slow
def test_metadata_service_down_while_valid_then_past_expiry(make_emulator, tmp_path):
    emulator = make_emulator(shards=2)
    with EcsMetadataServer(emulator, role_name=ROLE, lifetime=LONGER_LIFETIME, period=PERIOD) as metadata, \
            SyslogReceiver("tcp") as receiver:
        with ForwarderProcess(role_env(emulator, metadata, receiver.port), tmp_path) as forwarder:
            forwarder.wait_for_log("*** start to consume data")
            sent = []

            def add_and_deliver(seed):
                logs = realistic_logs(20, seed=seed, start_time=int(time.time()))
                emulator.add_logs(logs)
                sent.extend(logs)
                return wait_delivered(lambda: receiver.messages, trace_ids(logs))

            metadata.set_mode("down")
            down_at = metadata.state()["issued"][-1]
            # While the credentials last, nothing stops: the logs added meanwhile are delivered.
            assert add_and_deliver(1)["lost"] == 0
            forwarder.wait_for_log("cannot renew the RAM role credentials")
            assert add_and_deliver(2)["lost"] == 0
            assert not emulator.state()["temporary_credentials"][down_at]["expired"]

            # Past their expiration: a clear warning; once the service is back, consumption resumes.
            forwarder.wait_for_log("the RAM role credentials expired at", timeout=LONGER_LIFETIME + 10)
            wait_until(lambda: emulator.state()["refusals_by_access_key"], "SLS to refuse the expired credentials")
            more = realistic_logs(20, seed=3, start_time=int(time.time()))
            emulator.add_logs(more)
            metadata.set_mode("normal")
            report = wait_delivered(lambda: receiver.messages, trace_ids(sent + more))
            assert forwarder.stop() == 0
    assert report["lost"] == 0, report
    refusals = emulator.state()["refusals_by_access_key"].values()
    assert refusals and all(set(reasons) == {"token_expired"} for reasons in refusals)


STATIC_SECRET, STATIC_TOKEN = "static-secret-0123", "CAIS-static-token-0123"


def run_until_a_static_token_expires(make_emulator, tmp_path, args=(), timeout=60):
    """The forwarder (with `args`) on a static STS token that SLS takes for 10 s: (report of the
    logs delivered meanwhile, exit status, the stopped process)."""
    emulator = make_emulator(shards=2)
    akid = "STS.static"
    emulator.add_credentials(akid, STATIC_SECRET, STATIC_TOKEN, time.time() + 10)
    logs = realistic_logs(30, seed=4)
    emulator.add_logs(logs)
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SLS_AK_ID=akid, SLS_AK_KEY=STATIC_SECRET,
                            SLS_STS_TOKEN=STATIC_TOKEN)
        with ForwarderProcess(env, tmp_path, args) as forwarder:
            report = wait_delivered(lambda: receiver.messages, trace_ids(logs))
            status = forwarder.wait(timeout)
    return report, status, forwarder


@pytest.mark.slow
def test_an_expired_static_sts_token_ends_the_forwarder_naming_it(make_emulator, tmp_path):
    report, status, forwarder = run_until_a_static_token_expires(make_emulator, tmp_path)
    assert report["lost"] == 0 and status == 1
    errors = [line for line in forwarder.stderr().splitlines() if " ERROR " in line]
    named = [line for line in errors if "SLS_STS_TOKEN has expired" in line]
    assert len(named) == 1, errors
    assert_no_secret(output_of(forwarder), [STATIC_SECRET, STATIC_TOKEN])


@pytest.mark.slow
def test_an_expired_static_sts_token_stops_every_worker_instead_of_restarting_them(make_emulator, tmp_path):
    """--workers: a worker whose static token expired would fail the same way after a restart, so
    the supervisor stops them all and exits 1, as one process does."""
    report, status, supervisor = run_until_a_static_token_expires(make_emulator, tmp_path, ["--workers", "2"], 90)
    assert report["lost"] == 0 and status == 1
    stderr = supervisor.stderr()
    assert "SLS_STS_TOKEN has expired" in stderr
    assert "a restart would not help" in stderr and "restarting it" not in stderr, stderr
    assert_no_secret(output_of(supervisor), [STATIC_SECRET, STATIC_TOKEN])


@pytest.mark.slow
def test_check_names_the_credentials_the_signature_and_when_they_expire(make_emulator, tmp_path):
    emulator = make_emulator(shards=1)
    with EcsMetadataServer(emulator, role_name=ROLE, lifetime=3000, period=1800) as metadata, \
            SyslogReceiver("tcp") as receiver:
        # The region comes from the endpoint, as SLS's own would give it.
        env = role_env(emulator, metadata, receiver.port, SLS_ENDPOINT="http://cn-shanghai-intranet.log.aliyuncs.com",
                       SLS_REGION="")
        status, out, err = run_forwarder(env, tmp_path, ["--check"])
        assert status == 0, out + err
        assert f"OK   credentials: ECS RAM role {ROLE} (SLS_ECS_RAM_ROLE=auto)" in out
        assert re.search(r"they expire at \S+ \S+ UTC \(in (49|50) min \d+ s\)", out)
        assert "(signature v4)" in out

        static = forwarder_env(emulator, port=receiver.port, SLS_STS_TOKEN="a-token", SLS_AUTH_VERSION="v1")
        status, out, err = run_forwarder(static, tmp_path, ["--check"])
    assert status == 0  # the permanent key, with a token the emulator ignores for it
    assert "credentials: AccessKey test-akid from SLS_AK_ID / SLS_AK_KEY / SLS_STS_TOKEN; its STS " \
           "token expires when SLS says so" in out
    assert "a-token" not in out + err
    assert emulator.state()["requests_by_signature"] == {"v1": 2, "v4 cn-shanghai": 2}


@pytest.mark.slow
def test_key_files_are_followed_and_guarded(make_emulator, tmp_path):
    emulator = make_emulator(shards=2)
    first = ("STS.first", "first-secret-0123", "CAIS-first-token")
    second = ("STS.second", "second-secret-4567", "CAIS-second-token")
    for credential in (first, second):
        emulator.add_credentials(*credential, time.time() + 600)
    files = {name: tmp_path / name for name in ("id", "key", "token")}
    for path, value in zip(files.values(), first):
        write_atomically(path, value)
    files["token"].chmod(0o600)
    files["key"].chmod(0o640)
    logs = realistic_logs(20, seed=5)
    emulator.add_logs(logs)
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SLS_AK_ID="", SLS_AK_KEY="",
                            SLS_AK_ID_FILE=files["id"], SLS_AK_KEY_FILE=files["key"], SLS_STS_TOKEN_FILE=files["token"])
        with ForwarderProcess(env, tmp_path) as forwarder:
            assert wait_delivered(lambda: receiver.messages, trace_ids(logs))["lost"] == 0
            for path, value in zip(files.values(), second):
                write_atomically(path, value)
            wait_until(lambda: emulator.state()["requests_by_access_key"].get("STS.second"),
                       "requests signed with the new files' AccessKey")
            more = realistic_logs(20, seed=6, start_time=int(time.time()))
            emulator.add_logs(more)
            report = wait_delivered(lambda: receiver.messages, trace_ids(logs + more))
            assert forwarder.stop() == 0
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    assert emulator.state()["refusals_by_access_key"] == {}
    warned = [line for line in forwarder.stderr().splitlines()
              if "readable by group or others" in line and str(tmp_path) in line]
    assert len(warned) == 1 and f"{files['key']} can hold a secret" in warned[0] and "mode 0640" in warned[0]
    assert_no_secret(output_of(forwarder), [*first[1:], *second[1:]])
