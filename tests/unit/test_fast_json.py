"""The hot-path JSON: what the standard library wrote and read, it still writes and reads."""

import json
import math

import pytest

from src.core.utils import fast_json

VALUES = [
    {"custom_id": "d1", "output": [0.10000000149011612, -1.5e-7, 3e16, -0.0], "error": None},
    {"custom_id": "naïve ✓ 日本", "output": "line\nbreak \u2028 \x00 tab\t", "usage": {"n": 3}},
    {"big": 2**70, "neg": -(2**65)},  # past 64 bits: orjson refuses, the stdlib writes it
    {"lone": "\ud800 surrogate"},  # not UTF-8: written ASCII-escaped
    [],
    "",
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_reads_back_as_the_same_value_on_one_line(value):
    data = fast_json.dumps(value)
    assert b"\n" not in data
    assert json.loads(data) == value
    assert fast_json.loads(data) == value


def test_a_lone_surrogate_is_escaped_not_dropped():
    assert fast_json.dumps({"a": "\ud800"}) == b'{"a":"\\ud800"}'


@pytest.mark.parametrize("text", ['"\\ud800"', "NaN", "[1e400]", '{"a": Infinity}'])
def test_loads_reads_what_the_standard_library_reads(text):
    ours, theirs = fast_json.loads(text.encode()), json.loads(text)
    assert repr(ours) == repr(theirs) or (
        isinstance(theirs, float) and math.isnan(theirs) and math.isnan(ours)
    )


def test_loads_refuses_what_is_not_json():
    with pytest.raises(ValueError):
        fast_json.loads(b"<html>502 Bad Gateway</html>")
