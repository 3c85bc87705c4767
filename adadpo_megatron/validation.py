"""Validation helpers that every config dataclass uses: plain Python, imports nothing.

Each raises ``ValueError`` naming the full config key, the value and what is allowed, so a
bad YAML value is reported before anything is built.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any, Mapping, Optional, Type


def require_choice(key: str, value, choices) -> None:
    if value not in choices:
        allowed = ", ".join(map(repr, choices))
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {allowed}")


def require_int(key: str, value, *, low: int = 1) -> None:
    """Checks that ``value`` is an integer >= ``low`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} must be an integer >= {low}")


def require_number(key: str, value, *, low=None, high=None, low_open=False, high_open=False,
                    allow_inf=False) -> None:
    """Checks that ``value`` is a real number in the stated interval (bools are refused)."""
    low_bracket = "(" if low_open else "["
    high_bracket = ")" if high_open else "]"
    low_text = "-inf" if low is None else low
    high_text = "inf" if high is None else high
    allowed = f"{low_bracket}{low_text}, {high_text}{high_bracket}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}={value!r} must be a number in {allowed}")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{key}={value!r} must be a finite number in {allowed}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{key}={value!r} is out of range; allowed: {allowed}")


def require_like_defaults(cls, values: Mapping[str, Any], section: str) -> None:
    """Checks each value against the type of ``cls``'s default for that field (a number for
    a float default, an integer for an int, true/false for a bool, a string for a str);
    fields whose default is None or a container are left to ``cls`` itself. For the
    megatron-core dataclasses (TransformerConfig, OptimizerConfig) whose own checks run late
    or not at all, so that ``model.hidden_size=abc`` fails when the config is read."""
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    for key, value in values.items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        name = f"{section}.{key}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be true or false")
        elif isinstance(default, int):
            require_int(name, value, low=-(2 ** 63))
        elif isinstance(default, float):
            require_number(name, value, allow_inf=math.isinf(default))
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be a string")


def from_mapping[T](cls: Type[T], mapping: Optional[Mapping[str, Any]], section: str) -> T:
    """Builds dataclass ``cls`` from a YAML section, refusing keys it does not know.

    Raises:
        ValueError: naming ``section.key`` for an unknown key, with the known ones.
    """
    mapping = dict(mapping or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(f'{section}.{k}' for k in unknown)}; "
                         f"known keys of {section}: {', '.join(sorted(known))}")
    return cls(**mapping)
