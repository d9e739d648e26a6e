"""Spec objects: small frozen dataclasses holding one component's hyperparameters.

A spec knows its registered ``type`` name so that a whole layer configuration serializes to a plain dict
(``MoE.config.to_dict()``) and comes back with :func:`spec_from_dict`.

Registered specs check the types of the fields they are given before their own ``__post_init__`` runs: an ``int``
field takes an int (not a bool, not ``2.5`` or ``"2"``), a ``float`` field takes an int or a float, a ``bool`` a
bool, a ``str`` a str, and ``X | None`` also None; fields named in ``nonnegative_fields`` must be >= 0. The error
names the spec, the field, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar

from .registry import Registry

SPECS: Registry[type] = Registry("spec type")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
    type_name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    nonnegative_fields: ClassVar[tuple[str, ...]] = ()  # numeric fields that must be >= 0 (coefficients)
    legacy_fields: ClassVar[tuple[str, ...]] = ()  # keys older configs stored; ignored by spec_from_dict

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


_SIMPLE = {int: "an int", float: "a number", bool: "a bool", str: "a string"}


def _accepts(tp: Any, value: Any) -> tuple[bool, str] | None:
    """(ok, expected) for the simple annotations we check; None when the annotation is not checked."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, ""
        checks = [_accepts(a, value) for a in args if a is not type(None)]
        if any(c is None for c in checks):
            return None
        expected = " or ".join(c[1] for c in checks) + (" or None" if type(None) in args else "")
        return any(c[0] for c in checks), expected
    if tp is bool:
        return isinstance(value, bool), _SIMPLE[bool]
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), _SIMPLE[int]
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), _SIMPLE[float]
    if tp is str:
        return isinstance(value, str), _SIMPLE[str]
    return None


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: check nothing rather than fail at construction
        return {}
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def check_spec_fields(cls: type, values: dict[str, Any]) -> None:
    """Raise a TypeError (wrong type) or ValueError (negative coefficient, non-finite number) for ``values`` given
    to spec class ``cls``."""
    types_ = _field_types(cls)
    for name, value in values.items():
        tp = types_.get(name)
        if tp is None:
            continue
        verdict = _accepts(tp, value)
        if verdict is not None and not verdict[0]:
            raise TypeError(f"{cls.__name__}: {name} must be {verdict[1]}, got {value!r} ({type(value).__name__})")
        if name in cls.nonnegative_fields and isinstance(value, (int, float)) and not value >= 0:
            raise ValueError(f"{cls.__name__}: {name} must be >= 0, got {value!r}")


def register_spec(name: str, family: str):
    """Class decorator: register a Spec subclass under ``name`` in ``family`` (router, experts, ...) and check the
    field types of every construction (see the module docstring)."""

    def deco(cls):
        cls.type_name = name
        cls.family = family
        init = cls.__init__

        @functools.wraps(init)
        def checked_init(self, *args, **kwargs):
            check_spec_fields(type(self), kwargs)
            init(self, *args, **kwargs)

        cls.__init__ = checked_init
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
    for legacy in cls.legacy_fields:
        d.pop(legacy, None)
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
