"""One coercion rule for every setting (training config and loss config): values from a command line, a YAML or
JSON file or a saved config.json are converted to the type of the setting's current value, or refused in one line
naming the setting."""

from __future__ import annotations

from typing import Any

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
        raise ValueError(f"{what} {key} must be true or false, got {value!r}")
    if isinstance(value, bool) and isinstance(current, (int, float)):
        raise ValueError(f"{what} {key} must be a number, got {value!r}")
    if isinstance(current, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what} {key} must be an integer, got {value!r}") from None
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what} {key} must be a number, got {value!r}") from None
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"{what} {key} must be a string, got {value!r}")
