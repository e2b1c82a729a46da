"""Tags are taken in both dialects, by one rule in ``_validation``: a dict is MLflow's key/values, a
list of names is OICM's (``name: _OI_USER_TAG``); a bad one is refused at the call, naming it."""

from __future__ import annotations

import pytest

from tracklane import InvalidInputError
from tracklane._limits import MAX_EXPERIMENT_TAG_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH
from tracklane._validation import USER_TAG_VALUE, tag_dict

pytestmark = pytest.mark.unit


def test_a_dict_is_mlflows_keys_and_values_as_text() -> None:
    assert tag_dict({"team": "nlp", "epochs": 3}, "run") == {"team": "nlp", "epochs": "3"}


def test_a_list_of_names_is_oicms_each_once_in_order() -> None:
    assert tag_dict(["baseline", "candidate", "baseline"], "run") == {
        "baseline": USER_TAG_VALUE,
        "candidate": USER_TAG_VALUE,
    }
    assert USER_TAG_VALUE == "_OI_USER_TAG"


def test_no_tags_is_an_empty_dict() -> None:
    assert tag_dict(None, "experiment") == {}


def test_a_bare_string_is_refused_saying_to_pass_a_list() -> None:
    with pytest.raises(InvalidInputError, match=r"pass \['baseline'\]"):
        tag_dict("baseline", "run")


@pytest.mark.parametrize("tags", [{"bad key!": "x"}, ["bad key!"]])
def test_a_key_the_server_refuses_is_refused_naming_it(tags: object) -> None:
    with pytest.raises(InvalidInputError, match="bad key!"):
        tag_dict(tags, "run")


def test_each_tag_value_is_held_to_the_limit_of_what_it_tags() -> None:
    tag_dict({"note": "x" * MAX_EXPERIMENT_TAG_VALUE_LENGTH}, "experiment")
    tag_dict({"note": "x" * MAX_TAG_VALUE_LENGTH}, "run")
    with pytest.raises(InvalidInputError, match="note"):
        tag_dict({"note": "x" * (MAX_EXPERIMENT_TAG_VALUE_LENGTH + 1)}, "experiment")
    with pytest.raises(InvalidInputError, match="note"):
        tag_dict({"note": "x" * (MAX_TAG_VALUE_LENGTH + 1)}, "run")
