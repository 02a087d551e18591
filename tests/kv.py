"""A reference parser for the forwarder's key=value bodies: the inverse of `encode_kv`.

It reads left to right: a backslash starts an escape (`\\\\`, `\\n`, `\\r`, `\\xHH`, `\\=`, or
backslash + separator); an unescaped separator ends a field; the first unescaped `=` ends a key.
"""
import re

_SIMPLE = {"\\": "\\", "n": "\n", "r": "\r", "=": "="}


def parse_kv(body, separator):
    """[(key, value), ...] from a body written by encode_kv; raises ValueError if it is malformed."""
    fields, key, current, i = [], None, [], 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            if body.startswith(separator, i + 1):
                current.append(separator)
                i += 1 + len(separator)
                continue
            code = body[i + 1:i + 2]
            if code in _SIMPLE:
                current.append(_SIMPLE[code])
                i += 2
            elif code == "x" and re.fullmatch(r"[0-9a-f]{2}", body[i + 2:i + 4]):
                current.append(chr(int(body[i + 2:i + 4], 16)))
                i += 4
            else:
                raise ValueError(f"bad escape at {i}: {body[i:i + 6]!r}")
        elif body.startswith(separator, i):
            if key is None:
                raise ValueError(f"field without '=' before offset {i}")
            fields.append((key, "".join(current)))
            key, current = None, []
            i += len(separator)
        elif char == "=" and key is None:
            key, current = "".join(current), []
            i += 1
        else:
            current.append(char)
            i += 1
    if key is None:
        raise ValueError("last field without '='")
    fields.append((key, "".join(current)))
    return fields
