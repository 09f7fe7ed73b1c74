"""Result lines through orjson: every value reads back as what was written, as with the stdlib."""

import json
import math
from collections import OrderedDict

import pytest

from prefect_llamacpp import fast_json

VALUES = [
    {"custom_id": "d1", "output": [0.10000000149011612, -1.5e-7, 3e16, -0.0], "error": None},
    {"custom_id": "naïve ✓ 日本", "output": "line\nbreak \u2028 \x00 tab\t", "usage": {"n": 3}},
    {"big": 2**70, "neg": -(2**65)},  # past 64 bits: orjson refuses, the stdlib writes it
    {"lone": "\ud800 surrogate"},  # not UTF-8: written ASCII-escaped
    {"nested": [{"a": [1, "x", None, [2.5, {"b": True}]]}], "t": (1, 2)},
    {"output": [1e308, 1e308, -1e308]},  # finite, though their sum is not
    [],
    "",
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_reads_back_as_the_same_value_on_one_line(value):
    data = fast_json.dumps(value)
    assert b"\n" not in data
    expected = json.loads(json.dumps(value))  # a tuple reads back as a list, as before
    assert json.loads(data) == expected


def test_a_lone_surrogate_is_escaped_not_dropped():
    assert fast_json.dumps({"a": "\ud800"}) == b'{"a":"\\ud800"}'


@pytest.mark.parametrize(
    "value",
    [
        {"output": {"x": float("inf")}},  # a model's 1e999, read by json.loads
        {"output": [1.0, float("nan")]},
        {"output": [float("inf"), float("-inf")]},  # their sum is NaN, not infinite
        {"output": [1e308, 1e308, float("inf")]},
        {"body": {"data": [{"embedding": [0.5, float("-inf")]}]}},
        {"mixed": ["x", {"deep": [True, float("nan")]}]},
    ],
)
def test_nan_and_infinity_are_written_as_the_stdlib_writes_them_never_as_null(value):
    data = fast_json.dumps(value)
    assert b"null" not in data
    assert data == json.dumps(value, separators=(",", ":")).encode()
    back = json.loads(data)
    assert repr(back).replace("nan", "NaN") == repr(value).replace("nan", "NaN")


def test_finite_numbers_take_the_fast_path():
    record = {"output": [0.25, -1.0, 3], "usage": {"prompt_tokens": 2**40}, "latency_s": 0.1}
    assert (
        fast_json.dumps(record)
        == b'{"output":[0.25,-1.0,3],"usage":{"prompt_tokens":1099511627776},"latency_s":0.1}'
    )
    assert math.isfinite(json.loads(fast_json.dumps(record))["latency_s"])


def test_nan_inside_subclasses_of_dict_and_list_is_not_written_as_null():
    class Vector(list):
        pass

    value = OrderedDict(output=Vector([1.0, float("nan")]), usage={"n": float("inf")})
    assert fast_json.dumps(value) == b'{"output":[1.0,NaN],"usage":{"n":Infinity}}'
