"""Settings: every bad setting is exit status 2 with one clear line naming the variable, no
traceback, and the AccessKey secret / STS token never appear in any output."""
import os
import subprocess
import sys

import pytest

import sync_waf_to_syslog as fwd
from tests.forwarder_process import SCRIPT

SECRET = "S3cret-AK-must-never-print"
TOKEN = "STS-token-must-never-print"
GOOD = dict(SLS_ENDPOINT="sls.example.test", SLS_REGION="cn-hangzhou", SLS_AK_ID="test-akid",
            SLS_AK_KEY=SECRET, SLS_STS_TOKEN=TOKEN, SLS_PROJECT="waf-project", SLS_LOGSTORE="waf-logstore",
            SYSLOG_HOST="127.0.0.1")
NO_ACCESS_KEY = dict(SLS_AK_ID=None, SLS_AK_KEY=None, SLS_STS_TOKEN=None)


def main_in_process(env, monkeypatch, capsys):
    """The forwarder's main() in this process (the CLI's code path, without starting an interpreter)."""
    for name in os.environ:
        if name.startswith(("SLS_", "SYSLOG_", "SYNC_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    status = fwd.main([])
    out, err = capsys.readouterr()
    return status, out, err


def run_with(env, args=(), cwd=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLS_", "SYSLOG_", "SYNC_"))}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env={**clean, **env},
                            capture_output=True, text=True, timeout=60, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths standing for the words GARBAGE (a file that is no PEM), EMPTY (an empty file) and
    DIRECTORY (not a file) in BAD_SETTINGS."""
    folder = tmp_path_factory.mktemp("files")
    (folder / "not-a-certificate.pem").write_text("this is not a PEM file\n")
    (folder / "empty").write_text("\n")
    return {"GARBAGE": str(folder / "not-a-certificate.pem"), "EMPTY": str(folder / "empty"),
            "DIRECTORY": str(folder)}


BAD_SETTINGS = [
    ("SLS_ENDPOINT", dict(SLS_ENDPOINT=None)),
    ("SLS_AK_ID", dict(SLS_AK_ID="")),
    ("SLS_AK_KEY", dict(SLS_AK_KEY=None)),
    ("SLS_PROJECT", dict(SLS_PROJECT="  ")),
    ("SLS_LOGSTORE", dict(SLS_LOGSTORE=None)),
    ("SYSLOG_HOST", dict(SYSLOG_HOST=None)),
    ("SYSLOG_PORT", dict(SYSLOG_PORT="syslog")),
    ("SYSLOG_PORT", dict(SYSLOG_PORT="0")),
    ("SYSLOG_PORT", dict(SYSLOG_PORT="70000")),
    ("SYSLOG_PROTOCOL", dict(SYSLOG_PROTOCOL="http")),
    ("SYSLOG_FORMAT", dict(SYSLOG_FORMAT="rfc9999")),
    ("SYSLOG_FRAMING", dict(SYSLOG_FRAMING="nul")),
    ("SYSLOG_SEP", dict(SYSLOG_SEP="")),
    ("SYSLOG_SEP", dict(SYSLOG_SEP="a")),
    ("SYSLOG_SEP", dict(SYSLOG_SEP="\\")),
    ("SYSLOG_SEP", dict(SYSLOG_SEP="=")),
    ("SYSLOG_FACILITY", dict(SYSLOG_FACILITY="bogus")),
    ("SYSLOG_FACILITY", dict(SYSLOG_FACILITY="24")),
    ("SYSLOG_SEVERITY", dict(SYSLOG_SEVERITY="8")),
    ("SYSLOG_TAG", dict(SYSLOG_TAG="has space")),
    ("SYSLOG_TAG", dict(SYSLOG_FORMAT="rfc3164", SYSLOG_TAG="x" * 33)),
    ("SYSLOG_HOSTNAME", dict(SYSLOG_HOSTNAME="host name")),
    ("SYSLOG_MAX_MESSAGE_SIZE", dict(SYSLOG_PROTOCOL="udp", SYSLOG_MAX_MESSAGE_SIZE="70000")),
    ("SYSLOG_MAX_MESSAGE_SIZE", dict(SYSLOG_MAX_MESSAGE_SIZE="100")),
    ("SYSLOG_TIMEOUT", dict(SYSLOG_TIMEOUT="-1")),
    ("SLS_CURSOR_START", dict(SLS_CURSOR_START="yesterday")),
    ("SLS_CURSOR_END", dict(SLS_CURSOR_END="2026-13-45")),
    ("SLS_HEARTBEAT_INTERVAL", dict(SLS_HEARTBEAT_INTERVAL="0")),
    ("SLS_FETCH_INTERVAL", dict(SLS_FETCH_INTERVAL="fast")),
    ("SLS_MAX_FETCH_GROUPS", dict(SLS_MAX_FETCH_GROUPS="5000")),
    ("SLS_IN_ORDER", dict(SLS_IN_ORDER="yes")),
    ("SYNC_LOG_LEVEL", dict(SYNC_LOG_LEVEL="verbose")),
    ("SYSLOG_CERT_PATH", dict(SYSLOG_PROTOCOL="tls", SYSLOG_CERT_PATH="/nonexistent/ca.pem")),
    ("SYSLOG_CERT_PATH", dict(SYSLOG_PROTOCOL="tls", SYSLOG_CERT_PATH="GARBAGE")),
    ("SYSLOG_CLIENT_KEY", dict(SYSLOG_PROTOCOL="tls", SYSLOG_CLIENT_CERT="GARBAGE")),
    ("SYSLOG_CLIENT_KEY", dict(SYSLOG_PROTOCOL="tls", SYSLOG_CLIENT_CERT="GARBAGE",
                               SYSLOG_CLIENT_KEY="/nonexistent/client.key")),
    ("SYSLOG_CLIENT_CERT", dict(SYSLOG_PROTOCOL="tls", SYSLOG_CLIENT_CERT="GARBAGE",
                                SYSLOG_CLIENT_KEY="GARBAGE")),
    ("SYSLOG_ENCODING", dict(SYSLOG_ENCODING="xml")),
    ("SYSLOG_LEEF_DELIMITER", dict(SYSLOG_LEEF_DELIMITER="ab")),
    ("SYSLOG_LEEF_DELIMITER", dict(SYSLOG_LEEF_DELIMITER="=")),
    ("SYSLOG_LEEF_DELIMITER", dict(SYSLOG_LEEF_DELIMITER="_")),
    ("SYSLOG_LEEF_DELIMITER", dict(SYSLOG_LEEF_DELIMITER="x7c")),
    ("SYSLOG_FIELDS_INCLUDE", dict(SYSLOG_FIELDS_INCLUDE="host,http_cookie",
                                   SYSLOG_FIELDS_EXCLUDE="http_cookie")),
    ("SYSLOG_FIELDS_INCLUDE", dict(SYSLOG_FIELDS_INCLUDE="http_cookie", SYSLOG_FIELDS_EXCLUDE="http_*")),
    ("SYSLOG_FIELDS_RENAME", dict(SYSLOG_FIELDS_RENAME="host")),
    ("SYSLOG_FIELDS_RENAME", dict(SYSLOG_FIELDS_RENAME="host:")),
    ("SYSLOG_FIELDS_RENAME", dict(SYSLOG_FIELDS_RENAME="host:a,host:b")),
    ("SYSLOG_FIELDS_RENAME", dict(SYSLOG_FIELDS_RENAME="host:site,matched_host:site")),
    ("SYSLOG_FIELDS_RENAME", dict(SYSLOG_FIELDS_RENAME="http_cookie:cookie", SYSLOG_FIELDS_EXCLUDE="http_*")),
    ("SYSLOG_STATIC_FIELDS", dict(SYSLOG_STATIC_FIELDS="env")),
    ("SYSLOG_STATIC_FIELDS", dict(SYSLOG_STATIC_FIELDS="env=prod,=hz")),
    ("SLS_ECS_RAM_ROLE", dict(SLS_ECS_RAM_ROLE="auto")),  # and an AccessKey
    ("SLS_ECS_RAM_ROLE", dict(NO_ACCESS_KEY, SLS_ECS_RAM_ROLE="auto", SLS_STS_TOKEN_FILE="GARBAGE")),
    ("SLS_ECS_RAM_ROLE", dict(NO_ACCESS_KEY, SLS_ECS_RAM_ROLE="role name")),
    ("SLS_AK_KEY_FILE", dict(SLS_AK_KEY_FILE="GARBAGE")),  # and SLS_AK_KEY
    ("SLS_AK_KEY_FILE", dict(SLS_AK_KEY=None, SLS_AK_KEY_FILE="/nonexistent/key")),
    ("SLS_AK_ID_FILE", dict(SLS_AK_ID=None, SLS_AK_ID_FILE="DIRECTORY")),
    ("SLS_STS_TOKEN_FILE", dict(SLS_STS_TOKEN=None, SLS_STS_TOKEN_FILE="EMPTY")),
    ("SLS_ECS_METADATA_ENDPOINT", dict(NO_ACCESS_KEY, SLS_ECS_RAM_ROLE="auto",
                                       SLS_ECS_METADATA_ENDPOINT="100.100.100.200")),
    ("SLS_ECS_METADATA_V1", dict(SLS_ECS_METADATA_V1="sometimes")),
    ("SLS_AUTH_VERSION", dict(SLS_AUTH_VERSION="v2")),
    ("SLS_REGION", dict(SLS_REGION=None)),  # sls.example.test names no region
    ("SLS_REGION", dict(SLS_REGION="cn hangzhou")),
]


@pytest.mark.parametrize("variable, change", BAD_SETTINGS, ids=[f"{v}-{i}" for i, (v, _) in enumerate(BAD_SETTINGS)])
def test_bad_setting_exits_2_naming_the_variable(variable, change, files, monkeypatch, capsys):
    env = {**GOOD, **{k: files.get(v, v) for k, v in change.items()}}
    env = {k: v for k, v in env.items() if v is not None}
    status, out, err = main_in_process(env, monkeypatch, capsys)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], err
    assert "Traceback" not in err
    assert SECRET not in out + err and TOKEN not in out + err


def test_all_problems_are_reported_together():
    status, out, err = run_with(dict(SYSLOG_PORT="x", SYSLOG_PROTOCOL="smtp", SLS_AK_KEY=SECRET))
    assert status == 2
    for variable in ("SLS_ENDPOINT", "SLS_AK_ID", "SLS_PROJECT", "SLS_LOGSTORE", "SYSLOG_HOST",
                     "SYSLOG_PORT", "SYSLOG_PROTOCOL"):
        assert sum(variable + ":" in line for line in err.splitlines()) == 1, (variable, err)
    assert SECRET not in out + err


def test_missing_env_file_is_a_settings_error(tmp_path):
    status, _, err = run_with(GOOD, ["--env-file", str(tmp_path / "missing.env")])
    assert status == 2 and "--env-file" in err and "Traceback" not in err


def test_unreadable_env_file_or_missing_dotenv_is_one_line_and_exit_2(tmp_path):
    status, _, err = run_with(GOOD, ["--env-file", str(tmp_path)])  # a directory
    assert status == 2 and err.count("\n") == 1 and "--env-file" in err and "Traceback" not in err
    env_file = tmp_path / "forwarder.env"
    env_file.write_bytes(b"SYSLOG_PORT=\xff\xfe\n")  # not UTF-8
    status, _, err = run_with(GOOD, ["--env-file", str(env_file)])
    assert status == 2 and err.count("\n") == 1 and str(env_file) in err and "Traceback" not in err
    env_file.write_text("SYSLOG_PORT=1514\n")
    without_dotenv = ("import runpy, sys; sys.modules['dotenv'] = None; "
                      f"sys.argv = ['sync_waf_to_syslog.py', '--env-file', {str(env_file)!r}]; "
                      f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLS_", "SYSLOG_", "SYNC_"))}
    result = subprocess.run([sys.executable, "-c", without_dotenv], env={**clean, **GOOD},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "python-dotenv" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_env_file_is_read_and_the_real_environment_wins(tmp_path):
    env_file = tmp_path / "forwarder.env"
    env_file.write_text("SYSLOG_FACILITY=bogus\nSYSLOG_SEVERITY=warning\nSYSLOG_PORT=1514\n")
    values = fwd.load_env_file(str(env_file), {"SYSLOG_PORT": "2514"})
    assert values["SYSLOG_SEVERITY"] == "warning" and values["SYSLOG_PORT"] == "2514"
    status, _, err = run_with({**GOOD, "SYSLOG_SEVERITY": "info"}, ["--env-file", str(env_file)])
    assert status == 2 and "SYSLOG_FACILITY" in err and "SYSLOG_SEVERITY" not in err
    status, _, err = run_with({**GOOD, "SYSLOG_FACILITY": "local0", "SYSLOG_PROTOCOL": "nope"},
                              ["--env-file", str(env_file)])
    assert status == 2 and "SYSLOG_FACILITY" not in err and "SYSLOG_PROTOCOL" in err


def test_defaults_and_names():
    s = fwd.Settings.from_environment(dict(GOOD, SYSLOG_FACILITY="local7", SYSLOG_SEVERITY="warning",
                                           SLS_CURSOR_START="2026-11-01T00:00:00+08:00"))
    assert (s.sls_cg, s.syslog_protocol, s.syslog_port, s.syslog_format) == \
        ("WAF-SLS", "tcp", 514, "rfc5424")
    assert s.sls_consumer_name.startswith("WAF-SLS-")
    assert (s.syslog_facility, s.syslog_severity) == (23, 4)
    assert s.sls_cursor_start == "1793462400"
    assert fwd.Settings.from_environment(dict(GOOD, SYSLOG_PROTOCOL="tls")).syslog_port == 6514
    assert SECRET not in repr(s) and TOKEN not in repr(s)


def test_encoding_and_field_selection_settings():
    s = fwd.Settings.from_environment(dict(
        GOOD, SYSLOG_ENCODING="LEEF", SYSLOG_LEEF_DELIMITER="x5E", SLS_TOPICS="waf_access_log, other,",
        SYSLOG_FIELDS_INCLUDE=" __tag__:*, host ,,real_client_ip", SYSLOG_FIELDS_EXCLUDE="wxbb_*",
        SYSLOG_FIELDS_RENAME="__tag__:__receive_time__:received, host:domain"))
    assert (s.syslog_encoding, s.syslog_leef_delimiter) == ("leef", "^")
    assert s.sls_topics == {"waf_access_log", "other"}
    assert s.syslog_fields_include == ("__tag__:*", "host", "real_client_ip")
    assert s.syslog_fields_exclude == ("wxbb_*",)
    assert s.syslog_fields_rename == (("__tag__:__receive_time__", "received"), ("host", "domain"))
    s = fwd.Settings.from_environment(GOOD)
    assert (s.syslog_encoding, s.syslog_leef_delimiter, s.sls_topics) == ("kv", "\t", frozenset())
    assert s.syslog_fields_include == s.syslog_fields_exclude == s.syslog_fields_rename == ()
    for written, delimiter in (("\t", "\t"), ("x09", "\t"), ("0x09", "\t"), ("^", "^"), (" ~ ", "~")):
        s = fwd.Settings.from_environment(dict(GOOD, SYSLOG_LEEF_DELIMITER=written))
        assert s.syslog_leef_delimiter == delimiter, written


def test_static_fields_setting():
    s = fwd.Settings.from_environment(dict(GOOD, SYSLOG_STATIC_FIELDS=" env=prod, dc = hz ,,note=a=b"))
    assert s.syslog_static_fields == (("env", "prod"), ("dc", "hz"), ("note", "a=b"))
    assert fwd.Settings.from_environment(GOOD).syslog_static_fields == ()


def test_credential_settings():
    role = fwd.Settings.from_environment(dict(GOOD, **NO_ACCESS_KEY, SLS_ECS_RAM_ROLE="AUTO", SLS_REGION="",
                                              SLS_ENDPOINT="https://cn-beijing-intranet.log.aliyuncs.com"))
    assert (role.sls_ecs_ram_role, role.sls_ecs_metadata_endpoint, role.sls_ecs_metadata_v1) == \
        ("auto", "http://100.100.100.200", True)
    assert (role.sls_auth_version, role.sls_region) == ("v4", "cn-beijing")
    assert fwd.Settings.from_environment(dict(GOOD, SLS_REGION="", SLS_AUTH_VERSION="v1")).sls_region == ""
    keys = fwd.Settings.from_environment(dict(GOOD, SLS_AK_KEY=None, SLS_AK_KEY_FILE=__file__,
                                              SLS_ECS_METADATA_V1="off"))
    assert (keys.sls_ak_key, keys.sls_ak_key_file, keys.sls_ecs_metadata_v1) == ("", __file__, False)
    for endpoint, region in [("cn-hangzhou.log.aliyuncs.com", "cn-hangzhou"),
                             ("http://cn-hangzhou-finance-intranet.log.aliyuncs.com", "cn-hangzhou-finance"),
                             ("ap-southeast-1-share.log.aliyuncs.com:80", "ap-southeast-1"),
                             ("log-global.aliyuncs.com", ""), ("10.0.0.1", ""), ("sls.example.test", "")]:
        assert fwd.endpoint_region(endpoint) == region, endpoint


def test_every_setting_is_its_variable_and_documented():
    """Each Settings field is its variable's name in lower case, and every variable is in --help,
    README.md and .env.example."""
    status, out, _ = run_with({}, ["--help"])
    assert status == 0
    readme = (SCRIPT.parent / "README.md").read_text()
    example = (SCRIPT.parent / ".env.example").read_text()
    source = SCRIPT.read_text()
    for field in fwd.dataclasses.fields(fwd.Settings):
        variable = field.name.upper()
        assert f'"{variable}"' in source, f"Settings.{field.name} is not read from {variable}"
        assert variable in out, variable
        assert variable in readme, variable
        assert variable in example, variable
