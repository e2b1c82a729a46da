"""A corpus of malformed calls: each is stored exactly or refused at the call site with a message
naming the key and the rule, and none disturbs the valid events logged around it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from tracklane import InvalidInputError, TrackingClient

from servers import Reader


class TensorLike:
    """A 0-d scalar from some array library: has ``__float__`` and an empty shape."""

    shape = ()
    ndim = 0

    def __float__(self) -> float:
        return 0.75


class VectorLike:
    shape = (3,)
    ndim = 1

    def __float__(self) -> float:
        return 1.0


@dataclass
class Case:
    name: str
    call: Callable[[TrackingClient], None]
    refused: str | None = None  # a fragment the error must contain; None: must be stored
    metric: tuple[str, float, int] | None = None  # (key, value, step) expected on the server
    param: tuple[str, str] | None = None
    tag: tuple[str, str] | None = None


def metric(key: Any, value: Any, **kw: Any) -> Callable[[TrackingClient], None]:
    return lambda tc: tc.log_metric(key, value, **kw)


REFUSED = [
    Case("key with !", metric("bad key!", 1.0), refused="'bad key!'"),
    Case("key with tab", metric("tab\tkey", 1.0), refused="may only contain"),
    Case("key with newline", metric("line\nkey", 1.0), refused="may only contain"),
    Case("key with emoji", metric("loss🙂", 1.0), refused="may only contain"),
    Case("key of 251 chars", metric("k" * 251, 1.0), refused="at most 250"),
    Case("empty key", metric("", 1.0), refused="normalised"),
    Case("key '.'", metric(".", 1.0), refused="normalised"),
    Case("absolute key", metric("/abs", 1.0), refused="normalised"),
    Case("key escaping upwards", metric("../up", 1.0), refused="normalised"),
    Case("key with doubled slash", metric("a//b", 1.0), refused="normalised"),
    Case("key with trailing slash", metric("a/", 1.0), refused="normalised"),
    Case("None key", metric(None, 1.0), refused="must be strings"),
    Case("int key", metric(42, 1.0), refused="must be strings"),
    Case("bytes key", metric(b"loss", 1.0), refused="must be strings"),
    Case("unhashable list key", metric(["loss"], 1.0), refused="must be strings"),
    Case(
        "unhashable key in log_metrics", lambda tc: tc.log_metrics({("a",): 1.0}), refused="must be strings"
    ),
    Case("None value", metric("v_none", None), refused="'v_none'"),
    Case("True value", metric("v_true", True), refused="bool"),
    Case("False value", metric("v_false", False), refused="bool"),
    Case("numpy bool value", metric("v_npbool", np.bool_(True)), refused="bool"),
    Case("string value", metric("v_str", "0.5"), refused="real numbers"),
    Case("bytes value", metric("v_bytes", b"1"), refused="real numbers"),
    Case("list value", metric("v_list", [1.0]), refused="not a real number"),
    Case("dict value", metric("v_dict", {"a": 1}), refused="not a real number"),
    Case("complex value", metric("v_complex", 1 + 2j), refused="not a real number"),
    Case("int too large for a float", metric("v_huge", 10**400), refused="too large"),
    Case("numpy vector", metric("v_vec", np.array([1.0, 2.0])), refused="shape"),
    Case("tensor-like vector", metric("v_tvec", VectorLike()), refused="shape"),
    Case("object value", metric("v_obj", object()), refused="not a real number"),
    Case("float step", metric("s_float", 1.0, step=1.5), refused="steps must be integers"),
    Case("integral float step", metric("s_float1", 1.0, step=2.0), refused="int(2.0)"),
    Case("string step", metric("s_str", 1.0, step="3"), refused="steps must be integers"),
    Case("bool step", metric("s_bool", 1.0, step=True), refused="bool"),
    Case("step beyond int64", metric("s_big", 1.0, step=2**63), refused="64-bit"),
    Case("negative timestamp", metric("t_neg", 1.0, timestamp=-1), refused="non-negative"),
    Case("float timestamp", metric("t_float", 1.0, timestamp=1.5), refused="milliseconds"),
    Case("string timestamp", metric("t_str", 1.0, timestamp="now"), refused="milliseconds"),
    Case("bool timestamp", metric("t_bool", 1.0, timestamp=True), refused="milliseconds"),
    Case("param value of 6001 chars", lambda tc: tc.log_param("p_long", "x" * 6001), refused="at most 6000"),
    Case("param with a bad key", lambda tc: tc.log_param("p bad?", 1), refused="'p bad?'"),
    Case("params not a dict", lambda tc: tc.log_params([("a", 1)]), refused="dict"),  # type: ignore[arg-type]
    Case("metrics not a dict", lambda tc: tc.log_metrics([1.0]), refused="dict"),  # type: ignore[arg-type]
    Case("tag value of 8001 chars", lambda tc: tc.set_tag("t_long", "y" * 8001), refused="at most 8000"),
    Case("tag with a None key", lambda tc: tc.set_tag(None, "v"), refused="must be strings"),  # type: ignore[arg-type]
    Case("run tags as one string", lambda tc: tc.set_run_tags("baseline"), refused="list of tag names"),  # type: ignore[arg-type]
    Case("param changed in the run", lambda tc: tc.log_param("p_fixed", "2"), refused="cannot change"),
    Case(
        "log_metrics with one bad entry",
        lambda tc: tc.log_metrics({"lm_good": 1.0, "lm bad!": 2.0}, step=3),
        refused="'lm bad!'",
        metric=("lm_good", 1.0, 3),
    ),
]

STORED = [
    Case("unicode letters in a key", metric("λ_loss", 0.5), metric=("λ_loss", 0.5, 0)),
    Case("cyrillic key", metric("точность", 0.9), metric=("точность", 0.9, 0)),
    Case("key with colon and space", metric("val: top 1", 0.1), metric=("val: top 1", 0.1, 0)),
    Case("key of 250 chars", metric("k" * 250, 2.0), metric=("k" * 250, 2.0, 0)),
    Case("numpy float32", metric("np_f32", np.float32(0.5)), metric=("np_f32", 0.5, 0)),
    Case("numpy int64", metric("np_i64", np.int64(3)), metric=("np_i64", 3.0, 0)),
    Case("numpy 0-d array", metric("np_0d", np.array(2.5)), metric=("np_0d", 2.5, 0)),
    Case("numpy nan", metric("np_nan", np.float64("nan")), metric=("np_nan", math.nan, 0)),
    Case("tensor-like 0-d scalar", metric("tensor0d", TensorLike()), metric=("tensor0d", 0.75, 0)),
    Case("Fraction", metric("frac", Fraction(1, 4)), metric=("frac", 0.25, 0)),
    Case("Decimal", metric("dec", Decimal("0.1")), metric=("dec", 0.1, 0)),
    Case("largest float", metric("big", 1e308), metric=("big", 1e308, 0)),
    Case("tiny float", metric("tiny", -1e-308), metric=("tiny", -1e-308, 0)),
    Case("int value", metric("int_v", -5), metric=("int_v", -5.0, 0)),
    Case("negative step", metric("neg_step", 1.0, step=-3), metric=("neg_step", 1.0, -3)),
    Case("numpy int step", metric("np_step", 1.0, step=np.int64(5)), metric=("np_step", 1.0, 5)),
    Case("param of 6000 chars", lambda tc: tc.log_param("p_max", "x" * 6000), param=("p_max", "x" * 6000)),
    Case(
        "nested dict param",
        lambda tc: tc.log_param("p_nested", {"a": {"b": [1, 2]}}),
        param=("p_nested", "{'a': {'b': [1, 2]}}"),
    ),
    Case("None param", lambda tc: tc.log_param("p_none", None), param=("p_none", "None")),
    Case("unicode param value", lambda tc: tc.log_param("p_uni", "naïve ✓"), param=("p_uni", "naïve ✓")),
    Case("same param again", lambda tc: tc.log_param("p_fixed", "1"), param=("p_fixed", "1")),
    Case("tag of 8000 chars", lambda tc: tc.set_tag("t_max", "y" * 8000), tag=("t_max", "y" * 8000)),
    Case("int tag value", lambda tc: tc.set_tag("t_int", 7), tag=("t_int", "7")),
]


@pytest.mark.unit
def test_corpus_has_at_least_fifty_cases() -> None:
    assert len(REFUSED) + len(STORED) >= 50


def test_every_malformed_call_is_stored_exactly_or_refused_without_disturbing_its_neighbours(
    client: TrackingClient, reader: Reader
) -> None:
    with client.start_run() as run:
        client.log_param("p_fixed", "1")
        for i, case in enumerate(REFUSED + STORED):
            client.log_metric("sentinel", i, step=2 * i)
            if case.refused is not None:
                with pytest.raises(InvalidInputError) as error:
                    case.call(client)
                assert case.refused in str(error.value), f"{case.name}: {error.value}"
            else:
                case.call(client)
            client.log_metric("sentinel", i, step=2 * i + 1)

    run_id = run.info.run_id
    cases = REFUSED + STORED
    assert [p[1] for p in reader.history(run_id, "sentinel")] == list(range(2 * len(cases)))
    params, tags = reader.params(run_id), reader.tags(run_id)
    for case in cases:
        if case.metric is not None:
            key, value, step = case.metric
            [(stored, stored_step, _)] = reader.history(run_id, key)
            assert stored_step == step, case.name
            assert stored == value or (math.isnan(value) and math.isnan(stored)), case.name
        if case.param is not None:
            assert params[case.param[0]] == case.param[1], case.name
        if case.tag is not None:
            assert tags[case.tag[0]] == case.tag[1], case.name
    refused_keys = {"p_long", "t_long", "v_none", "s_float", "t_neg", "lm bad!"}
    metric_keys = {m["key"] for m in reader.run(run_id)["data"].get("metrics", [])}
    assert "lm_good" in metric_keys
    assert not refused_keys & (set(params) | set(tags) | metric_keys)
