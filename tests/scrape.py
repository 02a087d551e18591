"""Reading the forwarder's /metrics and /healthz (SYNC_METRICS_ADDR) in tests."""
import re
import urllib.error
import urllib.request

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never the emulator's proxy
_SAMPLE = re.compile(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$')


def get(port, path):
    """(HTTP status, body text) of GET http://127.0.0.1:port/path; (None, error) if unreachable."""
    try:
        with _DIRECT.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return None, str(error)


def metrics(port):
    """[(name, {label: value}, number)] of every sample /metrics serves; [] if it is not up."""
    status, text = get(port, "/metrics")
    if status != 200:
        return []
    samples = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, labels, value = _SAMPLE.match(line).groups()
            samples.append((name, dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or "")), float(value)))
    return samples


def total(samples, name):
    """The sum of a metric over all its series (e.g. over the workers)."""
    return sum(value for sample_name, _, value in samples if sample_name == name)
