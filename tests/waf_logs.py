"""Realistic and hostile Alibaba Cloud WAF logs for tests and benchmarks.

Every log is a dict of strings in SLS order: `__time__`, `__topic__`, `__source__`, one
`__tag__:` key, then the WAF content fields (55 of them for `realistic_logs`), the way a consumer
sees a WAF 3.0 logstore (field names and value shapes from Alibaba Cloud WAF 3.0 log field documentation).
`request_traceid` is unique per log, so a receiver can prove that nothing was lost.

Invalid UTF-8 cannot be written as a JSON string, so hostile logs carry it as lone surrogates
U+DC80..U+DCFF (Python's `surrogateescape`): the emulator stores those as the raw bytes 0x80..0xFF.
"""
import json
import random
import time

# The 55 WAF content fields of `realistic_logs`, in the order WAF writes them.
WAF_FIELDS = (
    "time", "start_time", "host", "matched_host", "real_client_ip", "src_ip", "src_port",
    "remote_addr", "remote_port", "dst_port", "server_port", "request_method", "request_path",
    "request_uri", "querystring", "request_body", "request_length", "request_time_msec",
    "request_traceid", "content_type", "http_cookie", "http_referer", "http_user_agent",
    "http_x_forwarded_for", "https", "server_protocol", "ssl_protocol", "ssl_cipher", "status",
    "body_bytes_sent", "upstream_addr", "upstream_response_time", "upstream_status", "region",
    "user_id", "final_action", "final_plugin", "final_rule_id", "final_rule_type",
    "bypass_matched_ids", "waf_action", "waf_rule_id", "waf_rule_type", "waf_test",
    "acl_action", "acl_rule_id", "acl_rule_type", "acl_test", "cc_action", "cc_rule_id",
    "cc_test", "antiscan_action", "antiscan_rule_type", "response_set_cookie", "wxbb_info_tbl",
)
assert len(WAF_FIELDS) == 55

_HOSTS = ("www.example.com", "api.example.com", "shop.example.cn", "m.example.com")
_PATHS = ("/", "/login", "/api/v1/orders", "/search", "/static/app.js", "/news/search.php",
          "/admin/config.php", "/wp-login.php")
_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "curl/8.5.0", "sqlmap/1.8#stable (https://sqlmap.org)", "python-requests/2.31.0",
)
_ATTACKS = (  # (final_action, final_plugin, final_rule_id, final_rule_type, querystring)
    ("block", "waf", "113001", "sqli", "id=1%27%20OR%201%3D1--"),
    ("block", "waf", "115341", "xss", "q=%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
    ("captcha", "cc", "8790391", "custom", "page=2"),
    ("block", "acl", "8790392", "blacklist", "-"),
    ("js", "antiscan", "12", "scantools", "dir=../../etc/passwd"),
)


def _ip(rng):
    return f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _iso8601_plus8(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%S+08:00", time.gmtime(seconds + 8 * 3600))


def realistic_log(index, rng, log_time):
    """One WAF access log as SLS delivers it: meta fields, a tag, then 55 content fields."""
    client, proxy = _ip(rng), _ip(rng)
    path = rng.choice(_PATHS)
    attacked = rng.random() < 0.2
    action, plugin, rule_id, rule_type, query = rng.choice(_ATTACKS) if attacked else (
        "", "", "", "", rng.choice(("-", "page=1&size=20", "utm_source=mail&utm_medium=link")))
    blocked = action == "block"
    log = {
        "__time__": str(log_time),
        "__topic__": "waf_access_log",
        "__source__": "log_service",
        "__tag__:__receive_time__": str(log_time + 1),
        "time": _iso8601_plus8(log_time),
        "start_time": str(log_time),
        "host": rng.choice(_HOSTS),
        "matched_host": "www.example.com-waf",
        "real_client_ip": client,
        "src_ip": proxy,
        "src_port": str(rng.randrange(1024, 65535)),
        "remote_addr": proxy,
        "remote_port": str(rng.randrange(1024, 65535)),
        "dst_port": "443",
        "server_port": "443",
        "request_method": rng.choice(("GET", "GET", "GET", "POST", "PUT")),
        "request_path": path,
        "request_uri": path if query == "-" else f"{path}?{query}",
        "querystring": query,
        "request_body": "-" if rng.random() < 0.7 else '{"user":"alice","remember":true}',
        "request_length": str(rng.randrange(200, 4000)),
        "request_time_msec": str(rng.randrange(1, 900)),
        "request_traceid": f"0bd5{index:012d}{rng.getrandbits(32):08x}",
        "content_type": rng.choice(("-", "application/json", "application/x-www-form-urlencoded")),
        "http_cookie": f"acw_tc={rng.getrandbits(64):016x}; session=abc{index}",
        "http_referer": rng.choice(("-", "https://www.example.com/", "https://www.google.com/")),
        "http_user_agent": rng.choice(_AGENTS),
        "http_x_forwarded_for": f"{client}, {proxy}",
        "https": "on",
        "server_protocol": "HTTP/1.1",
        "ssl_protocol": "TLSv1.3",
        "ssl_cipher": "TLS_AES_128_GCM_SHA256",
        "status": "405" if blocked else rng.choice(("200", "200", "200", "302", "404")),
        "body_bytes_sent": str(rng.randrange(0, 50000)),
        "upstream_addr": "-" if blocked else "192.0.2.10:443",
        "upstream_response_time": "-" if blocked else f"{rng.random():.3f}",
        "upstream_status": "-" if blocked else "200",
        "region": "cn",
        "user_id": "1234567890123456",
        "final_action": action,
        "final_plugin": plugin,
        "final_rule_id": rule_id,
        "final_rule_type": rule_type,
        "bypass_matched_ids": "283531,283532" if rng.random() < 0.05 else "",
        "waf_action": "block" if plugin == "waf" else "",
        "waf_rule_id": rule_id if plugin == "waf" else "",
        "waf_rule_type": rule_type if plugin == "waf" else "",
        "waf_test": "false",
        "acl_action": action if plugin == "acl" else "",
        "acl_rule_id": rule_id if plugin == "acl" else "",
        "acl_rule_type": "blacklist" if plugin == "acl" else "",
        "acl_test": "false",
        "cc_action": action if plugin == "cc" else "",
        "cc_rule_id": rule_id if plugin == "cc" else "",
        "cc_test": "false",
        "antiscan_action": action if plugin == "antiscan" else "",
        "antiscan_rule_type": rule_type if plugin == "antiscan" else "",
        "response_set_cookie": "nil",
        "wxbb_info_tbl": '{"new":"","reason":"wToken header not found","umid":""}',
    }
    assert tuple(log)[4:] == WAF_FIELDS
    return log


def realistic_logs(n, seed=0, start_time=None):
    """`n` realistic WAF logs, one second apart in groups of ten, starting at `start_time`."""
    rng = random.Random(seed)
    start = int(time.time()) - n // 10 - 60 if start_time is None else int(start_time)
    return [realistic_log(i, rng, start + i // 10) for i in range(n)]


def hostile_logs(start_time=None):
    """WAF logs whose attacker-controlled fields carry everything that breaks naive forwarders."""
    start = int(time.time()) - 600 if start_time is None else int(start_time)
    rng = random.Random(99)
    payloads = {
        "lf": "line one\nline two",
        "crlf": "header\r\nInjected: yes\r\n\r\nbody",
        "separators": "a,b,,c||d;e|f\tg=h==",
        "quotes": "\"double\" 'single' `back`",
        "brackets": "] [x@1 a=\"b\"] \\] \\\\",
        "backslashes": "C:\\Windows\\System32\\ \\n \\x41 \\",
        "utf8": "ümlaut 日本語 Ελληνικά עברית",
        "emoji": "😀🔥 family:👨‍👩‍👧 flag:🇨🇳",
        "huge": "A" * 9000,
        "huge_utf8": "é" * 4500,
        "empty": "",
        "controls": "nul:\x00 bell:\x07 esc:\x1b[31m del:\x7f tab:\t",
        "bom": "\ufeffstarts with a BOM",
        "invalid_utf8": "bad \udcff\udcfe bytes \udcc3( end",
        "truncated_utf8": "cut \udce6\udc97",
        "lookalike_header": "<134>1 2026-01-01T00:00:00Z evil app - - - forged",
        "json": '{"a":"b\\n","c":[1,2,{"d":null}]}',
        "leef_cef": "CEF:0|x|y|1|2|n|5|a=b\\=c LEEF:2.0|a|b|1|e|^|k=v^x=y",
    }
    logs = []
    for i, (name, payload) in enumerate(payloads.items()):
        log = realistic_log(10_000_000 + i, rng, start + i)
        log["request_traceid"] = f"hostile-{name}"
        for field in ("http_user_agent", "querystring", "request_body", "http_cookie", "http_referer"):
            log[field] = payload
        log[f"key_with_{name}"] = payload if name not in ("huge", "huge_utf8") else "x"
        logs.append(log)
    # Hostile keys: separators, '=' and spaces inside a key (SLS keys are normally [A-Za-z0-9_]).
    log = realistic_log(10_000_100, rng, start + len(logs))
    log["request_traceid"] = "hostile-keys"
    log["weird key=1,2||3"] = "value"
    log["k\nnewline"] = "v"
    logs.append(log)
    return logs


def write_jsonl(path, logs):
    """Write logs in the emulator's --load format (one JSON object per line, all values strings)."""
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as out:
        for log in logs:
            out.write(json.dumps(log, ensure_ascii=True) + "\n")
    return path


def log_group_list(logs):
    """An SDK `LogGroupListRaw` holding `logs`, one LogGroup per run of logs that share topic,
    source and tags. Surrogate-escaped values become raw bytes."""
    from aliyun.log.proto import LogGroupListRaw

    groups = LogGroupListRaw()
    shared_before = None
    for entry in logs:
        shared = {k: v for k, v in entry.items() if k in ("__topic__", "__source__") or k.startswith("__tag__:")}
        if shared != shared_before:
            group = groups.LogGroups.add()
            group.Topic, group.Source = shared.get("__topic__", ""), shared.get("__source__", "")
            for key, value in shared.items():
                if key.startswith("__tag__:"):
                    tag = group.LogTags.add()
                    tag.Key, tag.Value = key[len("__tag__:"):], value
            shared_before = shared
        item = group.Logs.add()
        item.Time = int(entry["__time__"])
        if "__time_ns_part__" in entry:
            item.Time_ns = int(entry["__time_ns_part__"])
        for key, value in entry.items():
            if not key.startswith("__"):
                content = item.Contents.add()
                content.Key, content.Value = key, value.encode("utf-8", "surrogateescape")
    return groups


def expected_fields(entry):
    """The (key, value) pairs a forwarder should send for one log, invalid UTF-8 shown as U+FFFD."""
    def text(value):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    fields = [("__topic__", entry.get("__topic__", "")), ("__source__", entry.get("__source__", ""))]
    fields += [(k, v) for k, v in entry.items() if k.startswith("__tag__:")]
    fields += [(k, text(v)) for k, v in entry.items() if not k.startswith("__")]
    return fields


def pull_body(logs):
    """The uncompressed body of a PullLogs answer holding `logs` (a serialized LogGroupList), as the
    SDK writes it: what the forwarder reads with read_log_groups."""
    return log_group_list(logs).SerializeToString()
