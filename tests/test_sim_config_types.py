"""sage_core.config_types as the simulator needs it: nested dataclasses that do not check themselves, a key-combination
hook, and one-line ValueErrors (never a TypeError) for odd keys, missing fields and non-finite numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sage_core.config_types import convert, from_mapping


@dataclass(frozen=True)
class Inner:
    """No __post_init__: only the walker checks its fields."""

    n: int = 1
    xs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Pair:
    low: float = 0.0
    high: float = 0.0

    @staticmethod
    def check_keys(values: dict) -> None:
        if ("low" in values) != ("high" in values):
            raise ValueError("low and high go together")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    items: tuple[Inner, ...] = ()
    pair: Pair = field(default_factory=Pair)


@dataclass(frozen=True)
class Needs:
    name: str


def test_nested_fields_are_converted_even_without_check_fields():
    """A nested dataclass without its own check_fields was built from the raw values ('3' stayed a string)."""
    with pytest.raises(ValueError, match=r"^inner.n must be an integer, got '3'$"):
        convert("inner", {"n": "3"}, Inner)
    with pytest.raises(ValueError, match=r"^items\[1\].xs must be a list of numbers, got 0.5$"):
        convert("items", [{}, {"xs": 0.5}], tuple[Inner, ...])
    out = from_mapping(Outer, {"inner": {"xs": [1, "2e-3"]}, "items": [{"n": 2}]})
    assert out == Outer(inner=Inner(xs=(1.0, 0.002)), items=(Inner(n=2),))
    assert isinstance(out.inner.xs, tuple) and isinstance(out.inner.xs[0], float)


def test_errors_name_the_dotted_path_and_the_top_level_has_no_prefix():
    """One style for every config error: the key's dotted path (`pair.low`), as range checks write it; nested
    errors read `pair: low must be ...` before."""
    with pytest.raises(ValueError, match=r"^pair.low must be a number, got 'x'$"):
        from_mapping(Outer, {"pair": {"low": "x", "high": 1}})
    with pytest.raises(ValueError, match=r"^outer.items\[0\].xs\[1\] must be a number, got 'y'$"):
        convert("outer", {"items": [{"xs": [1, "y"]}]}, Outer)
    with pytest.raises(ValueError, match=r"^unknown setting bogus \(known: inner, items, pair\)$"):
        from_mapping(Outer, {"bogus": 1})
    with pytest.raises(ValueError, match=r"^unknown setting inner.m \(known: n, xs\)$"):
        from_mapping(Outer, {"inner": {"m": 1}})


def test_check_keys_sees_which_keys_were_given():
    with pytest.raises(ValueError, match="^pair: low and high go together$"):
        from_mapping(Outer, {"pair": {"low": 1.0}})
    assert from_mapping(Outer, {"pair": {"low": 1, "high": 2}}).pair == Pair(1.0, 2.0)


def test_odd_keys_and_missing_fields_are_value_errors():
    """YAML keys may be numbers: sorting them with strings was a TypeError; a missing field was one too."""
    with pytest.raises(ValueError, match=r"^unknown settings cfg.1, cfg.foo \(known: n, xs\)$"):
        convert("cfg", {1: 2, "foo": 3}, Inner)
    with pytest.raises(ValueError, match=r"^missing setting who.name$"):
        convert("who", {}, Needs)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf"])
@pytest.mark.parametrize("tp", [float, float | None])
def test_non_finite_numbers_are_named_as_such(value, tp):
    """`float | None` said 'must be a number or null, got inf', as if inf were no number."""
    with pytest.raises(ValueError, match=r"^rate must be a finite number, got"):
        convert("rate", value, tp)
    assert convert("rate", None, float | None) is None
    with pytest.raises(ValueError, match=r"^rate must be a number or null, got 'fast'$"):
        convert("rate", "fast", float | None)


@pytest.mark.parametrize("tp", [float, float | None, tuple[float, ...]])
def test_an_integer_beyond_a_floats_range_is_a_config_error(tp):
    """10**400 for a float field was an OverflowError traceback (float() of it overflows)."""
    value = [10**400] if tp == tuple[float, ...] else 10**400
    with pytest.raises(ValueError, match=r"^rate(\[0\])? must be a finite number, got an integer of 401 digits$"):
        convert("rate", value, tp)
    assert convert("rate", 10**300, tp if tp != tuple[float, ...] else float) == 1e300
