"""Settings: the one engine that applies values to a tree of configuration dataclasses — the training config
(train/config.py) and, inside it, the loss config (train/losses.py).

Values come from a command line (``--set csa.rate=0.2``), a YAML or JSON file or a saved config.json. Keys may be
dotted (``csa.tau.max``) or nested mappings (``{"csa": {"tau": {"max": 0.9}}}``); each value is converted to the type
of the setting it replaces, and anything else is refused in one line naming the setting. A dataclass tells the engine
what it needs to know through plain class attributes and field metadata:

- ``SETTINGS_NAMING`` (a :class:`Naming`): its settings are named apart in messages ("loss setting csa.rate ..."),
  with keys counted from it;
- ``SHORTHAND``: a bare value given for the whole dataclass sets this one field (``csa.tau=0.3`` is ``csa.tau.init``);
- field metadata ``inline``: the sub-dataclass's own keys are accepted at this level too (``csa.rate`` as well as
  ``losses.csa.rate``);
- field metadata ``coerce``: ``fn(value, key)`` converts this setting's values instead of the rule by type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce_setting(value: Any, current: Any, key: str, what: str = "setting") -> Any:
    """``value`` as the type of ``current`` (bool, int, float or str); None on either side passes through."""
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(_expected(what, key, current, value))
    if isinstance(value, bool) and isinstance(current, (int, float)):
        raise ValueError(_expected(what, key, current, value))
    if isinstance(current, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(_expected(what, key, current, value)) from None
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(_expected(what, key, current, value)) from None
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(_expected(what, key, current, value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expected(what: str, key: str, current: Any, value: Any) -> str:
    kind = ("true or false" if isinstance(current, bool) else "an integer" if isinstance(current, int)
            else "a number" if isinstance(current, float) else "a string")
    return f"{what} {key} must be {kind}, got {value!r}"


@dataclass(frozen=True)
class Naming:
    """How a tree of settings names itself in its one-line errors, and how it reads strings."""

    what: str = "setting"  # "setting lr must be a number", "loss setting csa.rate must be a number"
    top: str | None = None  # the top level's name where a message lists its known keys (None: not listed)
    dotted_sections: bool = False  # a section is named with its trailing dot ("known under csa.: ...")
    fold_case: bool = False  # every string setting is a choice of names: "Add" means "add"

    def section(self, path: str) -> str | None:
        """The name of the section at ``path`` ("csa." / "csa"; the top level: ``top``)."""
        if not path:
            return None if self.top is None else self.top + ("." if self.dotted_sections else "")
        return path if self.dotted_sections else path.rstrip(".")


def apply_settings(obj: T, updates: Mapping[str, Any]) -> T:
    """A copy of the dataclass ``obj`` with ``updates`` (dotted or nested keys) applied: every value coerced to its
    setting's type, every changed dataclass validated by its ``__post_init__``; ValueError (one line) otherwise."""
    return _apply(obj, list(updates.items()), "", getattr(obj, "SETTINGS_NAMING", Naming()))


def flat_settings(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings mapping (a ``to_dict()``) as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _apply(obj: Any, items: list[tuple[Any, Any]], path: str, naming: Naming) -> Any:
    """``obj`` with the (key, value) ``items`` applied, keys relative to ``path``. Keys are grouped by their first
    part and handed down to that setting, so each level checks its own keys and names them its own way."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    inline = {f.name: {g.name for g in dataclasses.fields(getattr(obj, f.name))}
              for f in fields.values() if f.metadata.get("inline")}
    groups: dict[str, list[tuple[str | None, Any]]] = {}
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else [""]
        if not all(parts):
            raise ValueError(f"{naming.what} keys must be non-empty dotted names, got {key!r} under "
                             f"{path or naming.top or 'the top level'}")
        home = next((name for name, keys in inline.items() if parts[0] not in fields and parts[0] in keys), None)
        if home is not None:
            groups.setdefault(home, []).append((key, value))
        else:
            groups.setdefault(parts[0], []).append((".".join(parts[1:]) or None, value))
    changes = {key: _value(obj, fields, key, entries, path, naming) for key, entries in groups.items()}
    try:
        return dataclasses.replace(obj, **changes)
    except ValueError as err:  # a dataclass's own checks (__post_init__), named by its section
        raise ValueError(f"{naming.what} {path.rstrip('.') or naming.top or 'settings'}: {err}") from None


def _value(obj: Any, fields: Mapping[str, Any], key: str, entries: list[tuple[str | None, Any]], path: str,
           naming: Naming) -> Any:
    """The new value of setting ``key`` of ``obj`` from its ``entries``: (rest of a dotted key or None, value)."""
    where = f"{path}{key}"
    if key not in fields:
        raise ValueError(_unknown(naming, path, _leaf(key, entries[0]), fields))
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current):
        shorthand = getattr(current, "SHORTHAND", None)
        below: list[tuple[Any, Any]] = []
        for rest, value in entries:
            if rest is not None:
                below.append((rest, value))
                continue
            if shorthand is not None and not isinstance(value, (Mapping, bool)):
                value = {shorthand: value}
            if not isinstance(value, Mapping):
                if len(entries) > 1:
                    raise ValueError(f"{naming.what} {where} is given twice")
                raise ValueError(f"{naming.what} {where} must be a mapping, got {value!r}")
            below.extend(value.items())
        own = getattr(current, "SETTINGS_NAMING", None)
        return _apply(current, below, "" if own else f"{where}.", own or naming)
    if len(entries) > 1:
        raise ValueError(f"{naming.what} {where} is given twice")
    rest, value = entries[0]
    if rest is not None or isinstance(value, Mapping):  # keys below a plain setting ("lr.x", "data.root")
        raise ValueError(_unknown(naming, path, _leaf(key, entries[0]), fields))
    if value is None and _is_number(current) and fields[key].default is not None:
        raise ValueError(_expected(naming.what, where, current, value))  # a number that cannot be unset
    coerce = fields[key].metadata.get("coerce")
    value = coerce(value, where) if coerce else coerce_setting(value, current, where, naming.what)
    if naming.fold_case and isinstance(value, str):
        value = value.strip().lower()
    return value


def _leaf(key: str, entry: tuple[str | None, Any]) -> str:
    """A key as it was written down to its first leaf: "frozen.foo.bar", also from {"foo": {"bar": 1}}."""
    rest, value = entry
    name = f"{key}.{rest}" if rest else key
    below = next(iter(flat_settings(value)), None) if isinstance(value, Mapping) else None
    return f"{name}.{below}" if below else name


def _unknown(naming: Naming, path: str, key: str, fields: Mapping[str, Any]) -> str:
    message = f"unknown {naming.what} {path + key!r}"
    section = naming.section(path)
    if section is not None:
        message += f" (known under {section}: {', '.join(fields)})"
    return message
