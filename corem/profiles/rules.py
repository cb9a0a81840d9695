"""A profile's mapping and validation rules, applied to each point a payload decodes to.

For each field the profile names, in order: the type it must have; `scale` and `offset`
(value * scale + offset); `min` / `max` and `allowed` on the result; `unit`; then `rename`.  A
`required` field that is missing, or any broken rule, rejects the whole reading with a
`RuleViolation` naming the field and the rule.  Fields the profile does not name pass unchanged.
"""

from __future__ import annotations

import math
from typing import TypeVar

from .payload import PayloadError, Readings
from .spec import Rule

V = TypeVar("V")


class RuleViolation(PayloadError):
    """A reading that breaks one of its profile's rules (4.00; counted as `rule_violation`)."""


def apply(readings: Readings, rules: dict[str, Rule]) -> Readings:
    numeric, strings = dict(readings.numeric), dict(readings.strings)
    units = dict(readings.units or {})
    renames: list[tuple[str, str]] = []
    for name, rule in rules.items():
        if name in numeric:
            numeric[name] = _number(name, numeric[name], rule)
        elif name in strings:
            _text(name, strings[name], rule)
        elif rule.required:
            raise RuleViolation("required: the reading does not have it", name)
        else:
            continue
        if rule.unit is not None:
            units[name] = rule.unit
        if rule.rename is not None and rule.rename != name:
            renames.append((name, rule.rename))
    moving = {old for old, _ in renames}  # (swaps: a target that is itself renamed away is free)
    taken: set[str] = set()
    for old, new in renames:
        if ((new in numeric or new in strings) and new not in moving) or new in taken:
            # (a target with a rule of its own is no exception: its value would be lost, and the
            # renamed one would stand there unchecked by that rule)
            raise RuleViolation(f"rename: {new!r} is in the reading already", old)
        taken.add(new)
    if renames:
        numeric, strings, units = _renamed(numeric, renames), _renamed(strings, renames), _renamed(units, renames)
    return Readings(numeric, strings, readings.ts, units or None)


def _renamed(table: dict[str, V], renames: list[tuple[str, str]]) -> dict[str, V]:
    moved = {new: table.pop(old) for old, new in renames if old in table}
    table.update(moved)
    return table


def _number(name: str, value: float, rule: Rule) -> float:
    if rule.type == "string" or rule.allowed is not None:
        raise RuleViolation("type: expected text, got a number", name)
    if rule.scale is not None:
        value = _finite(value * rule.scale, "scale", name)
    if rule.offset is not None:
        value = _finite(value + rule.offset, "offset", name)
    if rule.min is not None and value < rule.min:
        raise RuleViolation(f"min: {value:g} is below {rule.min:g}", name)
    if rule.max is not None and value > rule.max:
        raise RuleViolation(f"max: {value:g} is above {rule.max:g}", name)
    return value


def _finite(value: float, rule: str, name: str) -> float:
    """A rule's result beyond a float's range is no number a point may carry (the bus's decoder
    refuses one): the reading is refused, as the lane leaves it to this path to do."""
    if not math.isfinite(value):
        raise RuleViolation(f"{rule}: the result is out of a number's range", name)
    return value


def _text(name: str, value: str, rule: Rule) -> None:
    numeric_rule = next((r for r in ("scale", "offset", "min", "max") if getattr(rule, r) is not None), None)
    if rule.type == "number" or numeric_rule is not None:
        raise RuleViolation(f"{'type' if rule.type == 'number' else numeric_rule}: expected a number, got text", name)
    if rule.allowed is not None and value not in rule.allowed:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise RuleViolation(f"allowed: {shown!r} is not one of {', '.join(rule.allowed)}", name)
