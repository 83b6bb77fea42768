"""What a change of rule set means to the person making it: rules created,
deleted, and fields changed from one value to another.

`plan.describe` speaks of slots and classes, which is what the kernel sees;
a dry run answers "what will my rules become" in the fields people write
("cache: rate 2mbit -> 5mbit").  Pure functions over model.Rule, no I/O; the
API returns `rule_changes()` and the CLI prints `describe()` of them.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from shaper.core.fields import BY_KEY
from shaper.core.model import FIELD_NAMES, Rule

# Destinations quoted in one change; the rest are counted (a rule may hold 100,000).
DST_EXAMPLES = 10


def natural_key(name: str) -> tuple:
    """Sort key putting rule-2 before rule-10 (digit runs compare as numbers)."""
    return tuple((0, int(part), part) if part.isdigit() else (1, part.lower(), part)
                 for part in re.split(r"(\d+)", name) if part)


def rule_changes(old: Iterable[Rule], new: Iterable[Rule], *, expired: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One entry per rule that is created, deleted or updated, in natural order of names.

    `old` is the rule set in force; a rule named in `expired` is there but no
    longer matches, so applying it again creates it afresh.
    """
    before = {r.name: r for r in old}
    after = {r.name: r for r in new}
    expired = set(expired)
    out: list[dict[str, Any]] = []
    for name in sorted(before.keys() | after.keys(), key=natural_key):
        was, will = before.get(name), after.get(name)
        if will is None:
            out.append({"name": name, "change": "deleted"})
        elif was is None or name in expired:
            entry: dict[str, Any] = {"name": name, "change": "created", "fields": _fields(will)}
            if name in expired:
                entry["expired"] = True
            entry.update(_dst_change((), will.dst))
            out.append(entry)
        elif was != will:
            old_fields, new_fields = _fields(was), _fields(will)
            changed = {k: {"old": old_fields.get(k), "new": new_fields.get(k)}
                       for k in FIELD_NAMES if k in old_fields or k in new_fields
                       if old_fields.get(k) != new_fields.get(k)}
            entry = {"name": name, "change": "updated", "fields": changed}
            if changed and will.ttl_us:
                # plan(): a rule whose parameters change runs for its TTL from now; new destinations alone do not.
                entry["restarts_ttl"] = True
            entry.update(_dst_change(was.dst, will.dst))
            out.append(entry)
    return out


def _fields(rule: Rule) -> dict[str, Any]:
    data = rule.to_dict()
    del data["name"], data["dst"]
    return data


def _dst_change(old: Iterable, new: Iterable) -> dict[str, Any]:
    old_set, new_set = set(old), set(new)
    added = sorted(new_set - old_set)
    removed = sorted(old_set - new_set)
    out: dict[str, Any] = {}
    if added:
        out["dst_added"] = [str(p) for p in added[:DST_EXAMPLES]]
        out["dst_added_count"] = len(added)
    if removed:
        out["dst_removed"] = [str(p) for p in removed[:DST_EXAMPLES]]
        out["dst_removed_count"] = len(removed)
    return out


def _value(value: Any, key: str = "") -> str:
    if value is None:  # left out: its default, when that is a word (direction egress), else unset
        default = BY_KEY[key].default if key in BY_KEY else None
        return default if isinstance(default, str) and default else "(unset)"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):  # ports, except: as the CLI takes them (5432,8000-8100)
        return ",".join(map(str, value))
    return str(value)


def _dst_text(change: Mapping[str, Any], sign: str, key: str, *, limit: int = 3) -> str:
    shown = change.get(key, [])
    count = change.get(key + "_count", len(shown))
    if not count:
        return ""
    if count > limit:
        return f"{sign}{count} destinations"
    return " ".join(sign + d for d in shown[:count])


def describe(change: Mapping[str, Any]) -> str:
    """One line in the user's words: '+ db (created): dst 10.0.0.5/32, delay 50ms',
    '~ cache: rate 2mbit -> 5mbit', '- old (deleted)'."""
    name, kind = change["name"], change["change"]
    if kind == "deleted":
        return f"- {name} (deleted)"
    if kind == "created":
        parts = []
        dst = _dst_text(change, "", "dst_added")
        if dst:
            parts.append("dst " + dst)
        parts += [f"{k} {_value(v)}" for k, v in change.get("fields", {}).items()]
        why = "created again: its TTL had passed" if change.get("expired") else "created"
        return f"+ {name} ({why})" + (": " + ", ".join(parts) if parts else "")
    parts = [f"{k} {_value(v['old'], k)} -> {_value(v['new'], k)}" for k, v in change.get("fields", {}).items()]
    dst = " ".join(t for t in (_dst_text(change, "+", "dst_added"), _dst_text(change, "-", "dst_removed")) if t)
    if dst:
        parts.append("dst " + dst)
    return f"~ {name}: " + ", ".join(parts) + (" (its TTL restarts)" if change.get("restarts_ttl") else "")


def changes_from(observed: Any, desired: Iterable[Rule], now_ns: int) -> list[dict[str, Any]]:
    """rule_changes() from the state a datapath holds (plan.Observed) to `desired`."""
    return rule_changes([o.rule for o in observed.rules.values()], desired, expired=observed.expired(now_ns))
