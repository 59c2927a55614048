"""The config field machinery: a :class:`Field` (type, default, choices, range) checks and copies one
value, :func:`F` and its shorthands (:func:`count`, :func:`seed`, :func:`fraction`) declare one in a line,
a :class:`Section` is a phase III method's own group of fields, and :func:`defaults` fills a tree of them.
The tables of fields, one per phase, are ``utils.schema``'s.

Where the code that implements the values keeps a registry (losses, LR schedules, optimisers), a field's
choices are read from it when a value is checked (:func:`registry_choices`), so adding a registry entry
is all it takes.
"""
from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from utils.errors import UserError

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
_PLURAL_NAMES = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


# the allowed values of a field: a tuple, or a zero-argument callable that returns one when a value is
# checked (a registry owned by a module that utils must not import at import time; see registry_choices)
Choices = tuple | Callable[[], tuple]


def registry_choices(module: str, name: str) -> Callable[[], tuple[str, ...]]:
    """Choices that are the keys of the registry `module.name` (e.g. `engine.losses.LOSSES`), read when
    a value is checked: the registry is the one list, and utils does not import engine (torch) at
    import time. Use as `F("ce", choices=registry_choices("engine.losses", "LOSSES"))`."""
    def choices() -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(module), name))

    return choices


@dataclass(frozen=True)
class Range:
    """The interval a number (or every number of a list) must lie in; None = unbounded on that side.
    Every float is also checked to be finite: NaN and infinity are never a valid setting."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False   # True: low itself is excluded (e.g. lr > 0)
    high_open: bool = False

    def contains(self, x: float) -> bool:
        if math.isnan(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))

    def text(self) -> str:
        """The interval as a reader writes it: `> 0`, `>= 1`, `in (0, 1)`, `in [0, 1]`."""
        low, high = _number_text(self.low), _number_text(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number_text(x: float | None) -> str:
    """An int as written (a seed's 4294967295), a float in its shortest form (0.1, 1e-08)."""
    return str(x) if isinstance(x, int) or x is None else f"{x:g}"


@dataclass(frozen=True)
class Field:
    """One config value: accepted type(s), default, optionally allowed choices (a tuple or a
    zero-argument callable returning one, resolved at every check: see `registry_choices`), and for
    numbers (or lists of numbers) the `Range` every value must lie in."""

    types: tuple
    default: Any
    choices: Choices | None = None
    nullable: bool = False
    item_type: type | None = None  # for lists
    range: Range | None = None     # numbers, or every item of a list of numbers
    hint: str = ""                 # what the value means, added to a range error
    # values that left the choices: old value -> how to say it now (a config that still sets one gets this
    # message instead of the list of choices)
    renamed: Mapping[Any, str] = field(default_factory=dict)

    def allowed(self) -> tuple | None:
        """The allowed values now (None: any value of the right type)."""
        return self.choices() if callable(self.choices) else self.choices

    @property
    def numeric(self) -> bool:
        """Whether the field holds a number or a list of numbers (such a field must declare a range)."""
        kinds = (self.item_type,) if list in self.types else self.types
        return any(t in (int, float) for t in kinds)

    def coerce(self, value: Any, path: str) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise UserError(f"Config key '{path}' must not be empty (null); default is {self.default!r}.")
        if float in self.types and isinstance(value, str):
            value = _float_or_text(value)
        ok = any(_is_instance(value, t) for t in self.types)
        if not ok:
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in self.types)
            raise UserError(f"Config key '{path}' must be {wanted}, got {value!r} ({type(value).__name__}).")
        if float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.item_type is not None:
            for item in value:
                if not _is_instance(item, self.item_type):
                    raise UserError(
                        f"Config key '{path}' must be a list of {_PLURAL_NAMES[self.item_type]}, got item {item!r}."
                    )
        for number in _numbers(value):
            self._check_number(number, path)
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            if value in self.renamed:
                raise UserError(f"{path}={value} was renamed: {self.renamed[value]}.")
            raise UserError(f"Config key '{path}' must be one of {', '.join(map(str, allowed))}; got {value!r}.")
        return copy.deepcopy(value)

    def _check_number(self, x: float, path: str) -> None:
        item = " (every item)" if isinstance(self.default, list) else ""
        if not math.isfinite(x):
            raise UserError(f"Config key '{path}'{item} must be a finite number, got {x!r}: NaN and infinity train "
                            f"nothing. Default: {self.default!r}.")
        if self.range is not None and not self.range.contains(x):
            raise UserError(f"Config key '{path}'{item} must be {self.range.text()}, got {x!r}"
                            f"{f' ({self.hint})' if self.hint else ''}. Default: {self.default!r}.")


def _numbers(value: Any) -> list[float]:
    """The numbers a (checked) value holds: itself, or a list's items (booleans are not numbers)."""
    items = value if isinstance(value, list) else [value]
    return [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]


def _float_or_text(text: str) -> float | str:
    """YAML 1.1 (PyYAML) reads `5e-4` as a string (it wants `5.0e-4`); a number key takes it as the number."""
    try:
        return float(text)
    except ValueError:
        return text


def _is_instance(value: Any, wanted: type) -> bool:
    if wanted is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if wanted is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, wanted)


def F(default: Any, *types: type, choices: Choices | None = None, nullable: bool = False,
      item: type | None = None, gt: float | None = None, ge: float | None = None, lt: float | None = None,
      le: float | None = None, hint: str = "", renamed: Mapping[Any, str] | None = None) -> Field:
    """A `Field` whose type is the default's unless `types` are given (the schema tables stay one line a
    key); `gt` / `ge` / `lt` / `le` bound a number (or every item of a list) as their names say."""
    if not types:
        types = (type(default),)
    bounded = any(b is not None for b in (gt, ge, lt, le))
    span = Range(low=gt if gt is not None else ge, high=lt if lt is not None else le,
                 low_open=gt is not None, high_open=lt is not None) if bounded else None
    return Field(types=types, default=default, choices=choices, nullable=nullable, item_type=item, range=span,
                 hint=hint, renamed=renamed or {})


# shorthands for the common ranges (the schema tables stay one line a key)
def count(default: int, *, minimum: int = 1, **kw: Any) -> Field:
    """A whole number >= `minimum` (sizes, epochs, iterations)."""
    return F(default, int, ge=minimum, **kw)


def seed(default: int = 0) -> Field:
    """A random seed: numpy takes 0 .. 2^32 - 1."""
    return F(default, int, ge=0, le=2**32 - 1)


def fraction(default: float, *, open_low: bool = True, open_high: bool = True, **kw: Any) -> Field:
    """A share in (0, 1) (either end included on request)."""
    bounds = {"gt" if open_low else "ge": 0.0, "lt" if open_high else "le": 1.0}
    return F(default, float, **bounds, **kw)


@dataclass(frozen=True, eq=False)
class Section:
    """A phase III method family's own config section (``engine.methods``: a method's ``section``):
    its fields, what it is for (``--help``), and an optional check of its values that involves more than
    one field's range (``check(values)`` raises a UserError)."""

    name: str
    fields: dict
    doc: str = ""
    check: Callable[[dict], None] | None = None

    def defaults(self) -> dict:
        return defaults(self.fields)


def defaults(section: dict) -> dict:
    """The complete defaults of a schema (section), e.g. `defaults(DATASET)`: a fresh nested dict."""
    return {key: defaults(spec) if isinstance(spec, dict) else copy.deepcopy(spec.default)
            for key, spec in section.items()}
