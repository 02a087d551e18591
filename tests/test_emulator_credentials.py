"""Temporary (STS) credentials in the SLS emulator, and the test ECS metadata service.

SLS traffic goes through the unmodified SDK; the metadata service is read with plain urllib, as
the forwarder's own client will read it.
"""
import datetime
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from aliyun.log import LogException, LogItem, PutLogsRequest
from aliyun.log.auth import AUTH_VERSION_4
from aliyun.log.credentials import Credentials, CredentialsProvider

from tests.ecs_metadata import EcsMetadataServer
from tests.polling import wait_until
from tests.sdk_consumer import AKID, LOGSTORE, PROJECT, emulator_for_sdk
from tests.sls_emulator import EmulatorProcess, log_client

pytestmark = pytest.mark.slow
ROLE = "sls-forwarder-role"
V4 = {"auth_version": AUTH_VERSION_4, "region": "cn-hangzhou"}
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def emulator(monkeypatch):
    with emulator_for_sdk(monkeypatch, 1) as emu:
        yield emu


def temporary_credential(emulator, name, lifetime=600.0):
    """Register a temporary credential; returns (access key id, secret, token, expiration)."""
    credential = (f"STS.{name}", f"{name}-secret", f"CAIS-{name}-token", time.time() + lifetime)
    emulator.add_credentials(*credential)
    return credential


def put_pull_and_list(client):
    """A POST with a body, GETs with a query: 4 requests, signed like every other one."""
    item = LogItem(timestamp=int(time.time()))
    item.push_back("request_traceid", "trace-1")
    client.put_logs(PutLogsRequest(PROJECT, LOGSTORE, "waf", "192.0.2.1", [item]))
    cursor = client.get_begin_cursor(PROJECT, LOGSTORE, 0).get_cursor()
    assert client.pull_logs(PROJECT, LOGSTORE, 0, cursor).get_log_count() >= 1
    assert len(client.list_shards(PROJECT, LOGSTORE).get_shards_info()) == 1


def refused(call):
    with pytest.raises(LogException) as raised:
        call()
    error = raised.value
    return error.resp_status, error.get_error_code(), error.get_error_message()


# ---------------------------------------------------------------------------------------------
# The emulator.

@pytest.mark.parametrize("signature", [{}, V4], ids=["v1", "v4"])
def test_a_temporary_credential_works_with_its_token_and_is_counted(emulator, signature):
    akid, secret, token, _ = temporary_credential(emulator, "one")
    put_pull_and_list(log_client(emulator, akid, secret, securityToken=token, **signature))
    put_pull_and_list(log_client(emulator, **signature))  # the permanent key still works

    state = emulator.state()
    assert state["requests_by_access_key"] == {akid: 4, AKID: 4}
    assert state["requests_by_signature"] == {f"v4 {V4['region']}" if signature else "v1": 8}
    assert state["refusals_by_access_key"] == {} and state["errors"] == {}
    assert state["temporary_credentials"][akid]["expired"] is False
    assert secret not in json.dumps(state) and token not in json.dumps(state)


def test_an_expired_token_is_refused_as_sls_does(emulator):
    akid, secret, token, expiration = temporary_credential(emulator, "short", lifetime=1)
    clients = [log_client(emulator, akid, secret, securityToken=token, **signature)
               for signature in ({}, V4)]
    for client in clients:
        client.list_shards(PROJECT, LOGSTORE)
    wait_until(lambda: time.time() >= expiration, what="the credential to expire")

    for client in clients:  # without a credentials refresher, the SDK does not retry a 401
        assert refused(lambda: client.list_shards(PROJECT, LOGSTORE)) == \
            (401, "Unauthorized", "The security token you provided has expired.")
    state = emulator.state()
    assert state["refusals_by_access_key"] == {akid: {"token_expired": 2}}
    assert state["requests_by_access_key"] == {akid: 2}
    assert state["temporary_credentials"][akid]["expired"] is True


def test_a_wrong_missing_or_unknown_token_is_refused_as_sls_does(emulator):
    akid, secret, token, _ = temporary_credential(emulator, "one")
    other_akid, _, other_token, _ = temporary_credential(emulator, "two")

    wrong = log_client(emulator, akid, secret, securityToken=other_token, **V4)
    assert refused(lambda: wrong.list_shards(PROJECT, LOGSTORE)) == \
        (401, "Unauthorized", "The security token you provided is invalid.")
    missing = log_client(emulator, akid, secret)
    assert refused(lambda: missing.list_shards(PROJECT, LOGSTORE)) == \
        (401, "Unauthorized", f"AccessKeyId not found: {akid}")
    unknown = log_client(emulator, "STS.unknown", secret, securityToken=token)
    assert refused(lambda: unknown.list_shards(PROJECT, LOGSTORE)) == \
        (401, "Unauthorized", "AccessKeyId not found: STS.unknown")
    for signature in ({}, V4):  # the token is a signed header: the message must not echo it
        bad_secret = log_client(emulator, akid, "not-the-secret", securityToken=token, **signature)
        status, code, message = refused(lambda: bad_secret.list_shards(PROJECT, LOGSTORE))
        assert (status, code) == (403, "SignatureNotMatch") and token not in message

    state = emulator.state()
    assert state["refusals_by_access_key"] == {
        akid: {"signature": 2, "token_invalid": 1, "token_missing": 1},
        "STS.unknown": {"unknown_key": 1}}
    assert state["errors"] == {"SignatureNotMatch": 2, "Unauthorized": 3}
    assert state["requests_by_access_key"] == {}
    assert other_akid in state["temporary_credentials"]


def test_credentials_are_added_through_the_admin_route_and_the_metadata_server(monkeypatch):
    with EmulatorProcess(shards=1) as emulator:
        for name, value in emulator.client_env().items():
            monkeypatch.setenv(name, value)
        with pytest.raises(urllib.error.HTTPError) as raised:  # a key is added once
            emulator.add_credentials(AKID, "secret", "token", time.time() + 60)
        assert raised.value.code == 400

        with EcsMetadataServer(emulator=emulator.addr) as metadata:  # registers by admin address
            served = fetch_credentials(metadata)
        client = log_client(emulator, served["AccessKeyId"], served["AccessKeySecret"],
                            securityToken=served["SecurityToken"])
        assert client.list_shards(PROJECT, LOGSTORE).get_shards_info()
        state = emulator.state()
        assert state["requests_by_access_key"] == {served["AccessKeyId"]: 1}
        assert state["temporary_credentials"][served["AccessKeyId"]]["expiration"] == \
            expiration_seconds(served)


# ---------------------------------------------------------------------------------------------
# The ECS metadata server, read as a metadata client would.

def metadata_request(server, path, method="GET", headers=None, timeout=10):
    """(status, body) of one request to the metadata server, never through a proxy."""
    request = urllib.request.Request(server.endpoint + path, method=method, headers=headers or {})
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metadata_token(server, ttl="60"):
    status, token = metadata_request(server, "/latest/api/token", "PUT",
                                     {"X-aliyun-ecs-metadata-token-ttl-seconds": ttl})
    assert status == 200
    return token


def fetch_credentials(server, token=True):
    """The role's credentials, the IMDSv2 way (token=True) or the v1 way."""
    headers = {"X-aliyun-ecs-metadata-token": metadata_token(server)} if token else {}
    status, role = metadata_request(server, "/latest/meta-data/ram/security-credentials/",
                                    headers=headers)
    assert status == 200
    status, body = metadata_request(server, "/latest/meta-data/ram/security-credentials/" + role,
                                    headers=headers)
    assert status == 200
    return json.loads(body)


def expiration_seconds(served):
    return datetime.datetime.strptime(served["Expiration"], "%Y-%m-%dT%H:%M:%SZ") \
        .replace(tzinfo=datetime.timezone.utc).timestamp()


def test_the_metadata_server_serves_the_role_credentials_with_and_without_a_token(emulator):
    with EcsMetadataServer(emulator=emulator, role_name=ROLE, lifetime=600, period=300) as metadata:
        fetched_at = time.time()
        served = fetch_credentials(metadata)
        assert set(served) == {"AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration",
                               "LastUpdated", "Code"}
        assert served["Code"] == "Success" and served["AccessKeyId"].startswith("STS.")
        assert fetched_at + 600 <= expiration_seconds(served) <= time.time() + 601
        assert fetch_credentials(metadata, token=False) == served  # v1, the same credential

        path = "/latest/meta-data/ram/security-credentials/"
        assert metadata_request(metadata, path, headers={"X-aliyun-ecs-metadata-token": "bogus"}) \
            == (401, "401 - Unauthorized")
        assert metadata_request(metadata, path + "other-role")[0] == 404
        assert metadata_request(metadata, "/latest/api/token")[0] == 405
        for ttl in ("0", "21601", "soon"):
            assert metadata_request(metadata, "/latest/api/token", "PUT",
                                    {"X-aliyun-ecs-metadata-token-ttl-seconds": ttl})[0] == 400
        assert metadata_token(metadata, ttl="21600")

        client = log_client(emulator, served["AccessKeyId"], served["AccessKeySecret"],
                            securityToken=served["SecurityToken"], **V4)
        put_pull_and_list(client)
        state = metadata.state()
    assert state["requests"] == {"token": 6, "role_name": 3, "credentials": 3}
    assert state["refused"] == {"token": 4, "role_name": 1, "credentials": 1}
    assert state["issued"] == [served["AccessKeyId"]]
    assert emulator.state()["requests_by_access_key"] == {served["AccessKeyId"]: 4}


def test_the_metadata_server_rotates_credentials_that_the_emulator_accepts(emulator):
    with EcsMetadataServer(emulator=emulator, lifetime=30, period=0.3) as metadata:
        first = fetch_credentials(metadata)

        def new_credential():
            served = fetch_credentials(metadata)
            return served if served["AccessKeyId"] != first["AccessKeyId"] else None

        second = wait_until(new_credential, what="the period to end and a new credential to be served")
        third = metadata.rotate()
        assert len({first["SecurityToken"], second["SecurityToken"], third["SecurityToken"]}) == 3
        issued = metadata.state()["issued"]
    assert issued[0] == first["AccessKeyId"] and issued[-1] == third["AccessKeyId"]
    assert second["AccessKeyId"] in issued

    for served in (first, second, third):  # the old ones stay valid until their expiration
        log_client(emulator, served["AccessKeyId"], served["AccessKeySecret"],
                   securityToken=served["SecurityToken"]).list_shards(PROJECT, LOGSTORE)
    state = emulator.state()
    assert sorted(state["temporary_credentials"]) == sorted(issued)
    assert state["requests_by_access_key"] == {served["AccessKeyId"]: 1 for served in (first, second, third)}


def test_the_metadata_server_modes(emulator):
    path = "/latest/meta-data/ram/security-credentials/"
    with EcsMetadataServer(emulator=emulator, role_name=ROLE) as metadata:
        metadata.set_mode("token-required")
        assert metadata_request(metadata, path) == (403, "403 - Forbidden")
        assert fetch_credentials(metadata)["Code"] == "Success"

        metadata.set_mode("v1-only")
        assert metadata_request(metadata, "/latest/api/token", "PUT",
                                {"X-aliyun-ecs-metadata-token-ttl-seconds": "60"})[0] == 404
        assert metadata_request(metadata, path, headers={"X-aliyun-ecs-metadata-token": "ignored"}) \
            == (200, ROLE)
        assert fetch_credentials(metadata, token=False)["Code"] == "Success"

        metadata.set_mode("down")
        assert metadata_request(metadata, "/latest/api/token", "PUT",
                                {"X-aliyun-ecs-metadata-token-ttl-seconds": "60"})[0] == 500
        assert metadata_request(metadata, path + ROLE) == (500, "500 - Internal Server Error")

        metadata.set_mode("slow", delay=2)
        with pytest.raises(socket.timeout):  # the answer comes after the client gave up
            metadata_request(metadata, path, timeout=0.2)
        metadata.set_mode("slow", delay=0.2)
        assert metadata_request(metadata, path) == (200, ROLE)

        metadata.set_mode("normal")
        assert fetch_credentials(metadata, token=False)["Code"] == "Success"
        with pytest.raises(ValueError):
            metadata.set_mode("slow")
        state = metadata.state()
    assert state["refused"] == {"role_name": 1, "token": 2, "credentials": 1}
    assert len(state["issued"]) == 1
    with pytest.raises(urllib.error.URLError):  # stopped: nothing listens any more
        metadata_request(metadata, path, timeout=5)
    with metadata:  # back on the same port
        assert metadata_request(metadata, path) == (200, ROLE)


# ---------------------------------------------------------------------------------------------
# The mechanism the forwarder will use: a LogClient with a credentials provider.

class MetadataCredentialsProvider(CredentialsProvider):
    """The role's credentials as the metadata server serves them at each call."""

    def __init__(self, metadata):
        self.metadata, self.calls = metadata, 0

    def get_credentials(self):
        self.calls += 1
        served = fetch_credentials(self.metadata)
        return Credentials(served["AccessKeyId"], served["AccessKeySecret"], served["SecurityToken"])


def test_a_log_client_with_a_credentials_provider_keeps_working_across_rotations(emulator):
    # Every credential served is still valid for a second at least.
    with EcsMetadataServer(emulator=emulator, lifetime=2, period=1) as metadata:
        provider = MetadataCredentialsProvider(metadata)
        client = log_client(emulator, None, None, credentials_provider=provider, **V4)
        put_pull_and_list(client)
        first = metadata.state()["issued"][0]
        wait_until(lambda: emulator.state()["temporary_credentials"][first]["expired"],
                   what="the first credential to expire")
        put_pull_and_list(client)
        issued = metadata.state()["issued"]

    state = emulator.state()
    assert state["errors"] == {} and state["refusals_by_access_key"] == {}
    assert state["requests_by_access_key"][first] == 4 and len(issued) >= 2
    assert set(state["requests_by_access_key"]) <= set(issued)
    # The SDK asks its provider once per request it signs.
    assert sum(state["requests_by_access_key"].values()) == 8 == provider.calls
