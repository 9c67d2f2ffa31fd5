"""Backoff: the delay formula and its jitter bounds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_resilience import Backoff, ConfigurationError

bases = st.floats(min_value=0, max_value=1e4, allow_nan=False)
factors = st.floats(min_value=1, max_value=10, allow_nan=False)
caps = st.floats(min_value=0, max_value=1e6, allow_nan=False)
retries = st.integers(min_value=0, max_value=2000)


@given(bases, factors, caps, retries)
def test_no_jitter_is_min_of_cap_and_exponential(
    base: float, factor: float, cap: float, n: int
) -> None:
    """With jitter "none" the delay is exactly min(cap, base * factor**n)."""
    try:
        expected = min(cap, base * factor**n)
    except OverflowError:
        expected = cap
    assert Backoff(base, factor, cap, "none").delay(n) == pytest.approx(expected)


@given(bases, factors, caps, retries, st.integers())
def test_full_jitter_stays_between_zero_and_ceiling(
    base: float, factor: float, cap: float, n: int, seed: int
) -> None:
    """Full jitter gives a delay in [0, d]."""
    policy = Backoff(base, factor, cap, "full")
    d = policy.delay(n, random.Random(seed))
    assert 0 <= d <= policy.ceiling(n) <= cap


@given(bases, factors, caps, retries, st.integers())
def test_equal_jitter_stays_between_half_and_ceiling(
    base: float, factor: float, cap: float, n: int, seed: int
) -> None:
    """Equal jitter (the default) gives a delay in [d/2, d]."""
    policy = Backoff(base, factor, cap)
    d = policy.delay(n, random.Random(seed))
    ceiling = policy.ceiling(n)
    assert ceiling / 2 <= d <= ceiling <= cap


@given(bases, factors, caps, retries)
def test_ceiling_never_decreases_with_retries(
    base: float, factor: float, cap: float, n: int
) -> None:
    """A later retry never waits less, before jitter, than an earlier one."""
    policy = Backoff(base, factor, cap, "none")
    assert policy.ceiling(n) <= policy.ceiling(n + 1)


def test_defaults_match_the_spec() -> None:
    """Defaults: base 2 s, factor 2, cap 600 s, equal jitter."""
    policy = Backoff()
    assert (policy.base, policy.factor, policy.cap, policy.jitter) == (2.0, 2.0, 600.0, "equal")
    assert [Backoff(jitter="none").delay(n) for n in range(4)] == [2.0, 4.0, 8.0, 16.0]
    assert Backoff(jitter="none").delay(20) == 600.0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"jitter": "half"}, "jitter='half'"),
        ({"base": -1}, "base=-1"),
        ({"factor": 0.5}, "factor=0.5"),
        ({"cap": "10"}, "cap='10'"),
    ],
)
def test_bad_backoff_is_a_configuration_error_naming_the_field(
    kwargs: dict[str, object], named: str
) -> None:
    """A bad Backoff argument fails at construction with the field and value."""
    with pytest.raises(ConfigurationError, match=named):
        Backoff(**kwargs)  # type: ignore[arg-type]
