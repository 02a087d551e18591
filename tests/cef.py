"""A strict CEF parser, written from the CEF implementation standard, to check what the forwarder sends.

    CEF:Version|Device Vendor|Device Product|Device Version|Device Event Class ID|Name|Severity|Extension

Header fields may escape only ``|`` and ``\\``. The extension is ``key=value`` pairs separated by a
space; keys are alphanumeric; values may escape only ``\\``, ``=``, ``n`` and ``r`` (``\\n`` and
``\\r`` are line breaks) and hold no unescaped ``=`` and no raw line break. Every unescaped ``=``
therefore ends a key, and the key starts after the last space before it, so a value may contain
spaces (even at its end). Anything else raises CefError: a malformed message fails a test instead
of being parsed by guesswork.
"""
import re

HEADER_FIELDS = ("version", "vendor", "product", "device_version", "event_class_id", "name", "severity")
_HEADER_ESCAPE = re.compile(r"\\(.?)|\|", re.S)
_VALUE_ESCAPES = {"\\": "\\", "=": "=", "n": "\n", "r": "\r"}
_KEY = re.compile("[A-Za-z0-9]+")


class CefError(ValueError):
    pass


def parse_cef(text):
    """(header as a dict of HEADER_FIELDS, extension as a list of (key, value)) of one CEF event."""
    if not text.startswith("CEF:"):
        raise CefError(f"does not start with CEF: {text[:40]!r}")
    if "\n" in text or "\r" in text:
        raise CefError("raw line break")
    fields, start = [], 0
    for match in _HEADER_ESCAPE.finditer(text):
        if match.group() == "|":
            fields.append(_unescape_header(text[start:match.start()]))
            start = match.end()
            if len(fields) == len(HEADER_FIELDS):
                break
        elif match.group(1) not in ("\\", "|"):
            raise CefError(f"bad escape in the header: {match.group()!r}")
    if len(fields) < len(HEADER_FIELDS):
        raise CefError(f"the header has {len(fields)} of {len(HEADER_FIELDS)} fields")
    header = dict(zip(HEADER_FIELDS, fields))
    header["version"] = header["version"][len("CEF:"):]
    return header, parse_extension(text[start:])


def _unescape_header(text):
    return re.sub(r"\\(.)", r"\1", text)


def parse_extension(extension):
    """[(key, value), ...] of a CEF extension, in order (keys may repeat)."""
    if not extension:
        return []
    # Escapes are consumed as units, so "\=" is never taken for the end of a key.
    equals = [m.start() for m in re.finditer(r"\\.|=", extension, re.S) if m.group() == "="]
    if not equals:
        raise CefError(f"extension without key=value: {extension[:60]!r}")
    pairs, key, value_start = [], extension[:equals[0]], equals[0] + 1
    for equal in equals[1:]:
        space = extension.rfind(" ", value_start, equal)
        if space < 0:
            raise CefError(f"unescaped = inside a value: {extension[value_start:equal + 1]!r}")
        pairs.append((_checked_key(key), unescape_value(extension[value_start:space])))
        key, value_start = extension[space + 1:equal], equal + 1
    pairs.append((_checked_key(key), unescape_value(extension[value_start:])))
    return pairs


def _checked_key(key):
    if not _KEY.fullmatch(key):
        raise CefError(f"key is not alphanumeric: {key!r}")
    return key


def unescape_value(text):
    """A CEF extension value as text (strict: only \\\\ \\= \\n \\r)."""
    def replace(match):
        if match.group(1) not in _VALUE_ESCAPES:
            raise CefError(f"bad escape in a value: {match.group()!r} in {text[:60]!r}")
        return _VALUE_ESCAPES[match.group(1)]
    return re.sub(r"\\(.?)", replace, text, flags=re.S)
