"""How a unique key is derived and stored (``celery_pgqueue.unique``): pure functions."""

from __future__ import annotations

import pytest

from celery_pgqueue.errors import ConfigurationError
from celery_pgqueue.unique import key_for, stored_key


def test_a_short_key_is_stored_readably_with_its_task_name() -> None:
    assert stored_key("shop.charge", "order-42") == "shop.charge:order-42"


def test_names_and_keys_that_would_read_alike_are_stored_apart() -> None:
    # "a:b" + "c" and "a" + "b:c" would both read "a:b:c".
    assert stored_key("a:b", "c") != stored_key("a", "b:c")
    assert ":" not in stored_key("a:b", "c")


def test_a_key_too_long_for_the_column_becomes_a_digest_that_still_tells_keys_apart() -> None:
    long_a, long_b = "x" * 300, "x" * 299 + "y"
    assert len(stored_key("shop.charge", long_a)) <= 255
    assert stored_key("shop.charge", long_a) != stored_key("shop.charge", long_b)
    assert stored_key("shop.charge", long_a).startswith("shop.charge#")
    assert len(stored_key("n" * 500, "k")) <= 255


def test_the_arguments_as_a_key_ignore_keyword_order() -> None:
    assert key_for(True, None, (1,), {"a": 1, "b": 2}) == key_for(True, None, [1], {"b": 2, "a": 1})


def test_a_call_overrides_the_task_default_and_false_turns_it_off() -> None:
    assert key_for("mine", True, (1,), {}) == "mine"
    assert key_for(False, "fixed", (1,), {}) is None
    assert key_for(None, "fixed", (1,), {}) == "fixed"
    assert key_for(None, lambda n: f"n-{n}", (7,), {}) == "n-7"
    assert key_for(None, lambda n: None, (7,), {}) is None
    assert key_for(42, None, (), {}) == "42"


@pytest.mark.parametrize("bad", ["", ["a"], 1.5, b"k"])
def test_a_key_that_is_not_text_is_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="unique_key"):
        key_for(bad, None, (), {})
