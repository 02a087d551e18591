"""A LEEF 2.0 parser, written from IBM's LEEF guide, to check what the forwarder sends.

    LEEF:2.0|Vendor|Product|Version|EventID|Delimiter|key=value<delimiter>key=value...

The header ends at its sixth ``|``; the delimiter field is one character or its hex code (``x09``,
``0x09``). LEEF has no escaping, so the attributes are split at every delimiter and each attribute
at its first ``=``; a key must be non-empty and hold no whitespace. A raw line break anywhere raises
LeefError, as does anything else malformed.
"""
import re

HEADER_FIELDS = ("version", "vendor", "product", "device_version", "event_id", "delimiter")


class LeefError(ValueError):
    pass


def parse_leef(text):
    """(header as a dict of HEADER_FIELDS, with the delimiter decoded; attributes as [(key, value)])."""
    if "\n" in text or "\r" in text:
        raise LeefError("raw line break")
    parts = text.split("|", len(HEADER_FIELDS))
    if len(parts) <= len(HEADER_FIELDS) or parts[0] != "LEEF:2.0":
        raise LeefError(f"not a LEEF 2.0 header: {text[:80]!r}")
    header = dict(zip(HEADER_FIELDS, parts))
    header["version"] = header["version"][len("LEEF:"):]
    hex_code = re.fullmatch(r"0?x([0-9a-fA-F]{2})", header["delimiter"])
    if hex_code:
        header["delimiter"] = chr(int(hex_code.group(1), 16))
    if len(header["delimiter"]) != 1:
        raise LeefError(f"bad delimiter field {header['delimiter']!r}")
    attributes = []
    for attribute in parts[-1].split(header["delimiter"]) if parts[-1] else []:
        key, equal, value = attribute.partition("=")
        if not equal or not key or re.search(r"\s", key):
            raise LeefError(f"bad attribute {attribute[:60]!r}")
        attributes.append((key, value))
    return header, attributes
