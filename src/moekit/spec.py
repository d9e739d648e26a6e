"""Spec objects: small frozen dataclasses holding one component's hyperparameters.

A spec knows its registered ``type`` name so that a whole layer configuration serializes to a plain dict
(``MoE.config.to_dict()``) and comes back with :func:`spec_from_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .registry import Registry

SPECS: Registry[type] = Registry("spec type")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
    type_name: ClassVar[str] = ""
    family: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def register_spec(name: str, family: str):
    """Class decorator: register a Spec subclass under ``name`` in ``family`` (router, experts, ...)."""

    def deco(cls):
        cls.type_name = name
        cls.family = family
        SPECS.register(f"{family}:{name}")(cls)
        return cls

    return deco


def spec_from_dict(family: str, d: dict[str, Any]) -> Spec:
    d = dict(d)
    name = d.pop("type", None)
    if name is None:
        raise ValueError(f"{family} spec dict needs a 'type' key, got {sorted(d)}")
    try:
        cls = SPECS.get(f"{family}:{name}")
    except KeyError:
        valid = [n.split(":", 1)[1] for n in SPECS.names() if n.startswith(family + ":")]
        raise KeyError(f"unknown {family} type {name!r}; valid choices: {', '.join(valid)}") from None
    field_names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - field_names
    if unknown:
        raise ValueError(f"unknown fields for {family} {name!r}: {sorted(unknown)}; valid: {sorted(field_names)}")
    return cls(**d)


def resolve(family: str, value: Any) -> Any:
    """Turn a string name into a default spec of that type; pass specs and built modules through."""
    if isinstance(value, str):
        return spec_from_dict(family, {"type": value})
    if isinstance(value, dict):
        return spec_from_dict(family, value)
    return value
