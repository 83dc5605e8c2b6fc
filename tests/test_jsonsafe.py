"""Everything streamd writes is JSON any parser reads: no NaN or Infinity, in records, events or API bodies."""

import json
import math

import pytest

from streamd import jsonsafe


def test_non_finite_numbers_are_written_as_null_and_the_rest_kept():
    doc = {"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": (2, "x"), "e": None}
    text = jsonsafe.dumps(doc)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} written")) == \
        {"a": None, "b": [1.5, None, {"c": None}], "d": [2, "x"], "e": None}
    assert jsonsafe.dumps({"x": 0.1}) == json.dumps({"x": 0.1})  # the fast path is plain json


@pytest.mark.parametrize("text", ['{"x": NaN}', '[Infinity]', '{"x": -Infinity}', '{"x": 1e999}', '[-1e400]'])
def test_reading_refuses_what_is_not_a_json_number(text):
    with pytest.raises(jsonsafe.NonFiniteNumber):
        jsonsafe.loads(text)
    assert not all(math.isfinite(v) for v in _floats(json.loads(text)))  # what Python's json would have let in


def _floats(obj):
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [v for v in obj if isinstance(v, float)]
