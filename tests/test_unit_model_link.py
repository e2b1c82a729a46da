"""MLflow 3's metric link fields (model_id, dataset_name, dataset_digest) are checked at the call:
a value of another type would reach neither the server's JSON nor the event log intact."""

from __future__ import annotations

import pytest

from tracklane._delivery.buffer import Buffer
from tracklane._exceptions import InvalidInputError
from tracklane._settings import EngineConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("link", "field"),
    [
        ((7, None, None), "model_id"),
        (("m-1", 3, "d"), "dataset_name"),
        (("m-1", "train", b"x"), "dataset_digest"),
    ],
)
def test_a_link_field_that_is_not_a_string_is_refused_naming_the_key_and_field(
    link: tuple[object, object, object], field: str
) -> None:
    buffer = Buffer(EngineConfig())
    with pytest.raises(InvalidInputError, match=rf"metric 'acc': {field}=.* must be a string"):
        buffer.log_model_metric("run-1", "acc", 0.5, 1, None, link)  # type: ignore[arg-type]
    assert len(buffer) == 0


def test_string_link_fields_and_none_are_accepted() -> None:
    buffer = Buffer(EngineConfig())
    buffer.log_model_metric("run-1", "acc", 0.5, 1, None, ("m-1", None, None))
    buffer.log_model_metric("run-1", "acc", 0.6, 2, None, ("m-1", "train", "abc123"))
    assert len(buffer) == 2
