"""Defenses against emergent misalignment during a fine-tune. Each is one small class returning
named loss terms (defenses/base.py); adding one is adding a file and an entry here."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from em_bench.defenses.base import DefenseContext
from em_bench.defenses.blockem import BlockEM, blockem_defaults, blockem_inputs
from em_bench.defenses.kl import KL
from em_bench.defenses.retain import Retain, retain_inputs
from em_bench.errors import ConfigError, UnknownNameError, validation_problems

DEFENSES: dict[str, type | None] = {"none": None, "retain": Retain, "kl": KL, "blockem": BlockEM}
# What a defense's cell depends on beyond its parameters (files, by content), for the cell hash.
_INPUTS = {"blockem": blockem_inputs, "retain": retain_inputs}
# Defaults that depend on the model (filled in when a cell is resolved, so its hash holds them).
_MODEL_DEFAULTS = {"blockem": blockem_defaults}
DEFAULT = "default"  # a parameter given as `default` is the same as a parameter left out


def check_defense(name: str, params: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """The defense's validated parameters, defaults filled in, and with `model` also the defaults
    that depend on the model: a parameter left out, given as `default` or given as its default
    value is one set of parameters, so one cell. A bad name or value raises."""
    params = {k: v for k, v in params.items() if v != DEFAULT}
    if name not in DEFENSES:
        raise UnknownNameError("defense", name, list(DEFENSES))
    cls = DEFENSES[name]
    if cls is None:
        if params:
            raise ConfigError(f"defense none takes no parameters, not {sorted(params)}")
        return {}
    try:
        checked = cls.Params.model_validate(params).model_dump(mode="json", by_alias=True)
    except ValidationError as e:
        raise ConfigError(f"defense {name}: {validation_problems(e)}") from None
    if model is not None and name in _MODEL_DEFAULTS:
        checked = _MODEL_DEFAULTS[name](checked, model)
    return checked


def make_defenses(name: str, params: dict[str, Any], ctx: DefenseContext) -> tuple:
    """The defense objects of one cell (none for `none`)."""
    cls = DEFENSES[name]
    return () if cls is None else (cls(cls.Params.model_validate(params), ctx),)


def defense_inputs(name: str, params: dict[str, Any], ctx: DefenseContext) -> dict:
    return _INPUTS[name](params, ctx) if name in _INPUTS else {}
