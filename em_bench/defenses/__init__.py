"""Defenses against emergent misalignment during a fine-tune. Each is one small class returning
named loss terms (defenses/base.py), registered by name in registry.DEFENSES (a plugin package
adds one through the `em_bench.defenses` entry-point group)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from em_bench.errors import ConfigError, validation_problems
from em_bench.registry import DEFENSES

DEFAULT = "default"  # a parameter given as `default` is the same as a parameter left out


def check_defense(name: str, params: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """The defense's validated parameters, defaults filled in, and with `model` also the defaults
    that depend on the model (a defense's `model_defaults`): a parameter left out, given as
    `default` or given as its default value is one set of parameters, so one cell. A bad name or
    value raises."""
    params = {k: v for k, v in params.items() if v != DEFAULT}
    cls = DEFENSES.get(name)
    if cls is None:
        if params:
            raise ConfigError(f"defense none takes no parameters, not {sorted(params)}")
        return {}
    try:
        checked = cls.Params.model_validate(params).model_dump(mode="json", by_alias=True)
    except ValidationError as e:
        raise ConfigError(f"defense {name}: {validation_problems(e)}") from None
    if model is not None and hasattr(cls, "model_defaults"):
        checked = cls.model_defaults(checked, model)
    return checked


def make_defenses(name: str, params: dict[str, Any], ctx) -> tuple:
    """The defense objects of one cell (none for `none`)."""
    cls = DEFENSES.get(name)
    return () if cls is None else (cls(cls.Params.model_validate(params), ctx),)


def defense_inputs(name: str, params: dict[str, Any], ctx) -> dict:
    """What a cell of the defense depends on beyond its parameters (files, by content), for the
    cell hash: the defense's `inputs`, if it has one."""
    cls = DEFENSES.get(name)
    return cls.inputs(params, ctx) if hasattr(cls, "inputs") else {}


def describe_defense(name: str, params: dict[str, Any], ctx) -> dict:
    """What a cell of the defense is, for a reader of its row (blockem: form, layers,
    selection, K, lambda): the defense's `describe`, if it has one; stored beside the cell,
    never in its hash."""
    cls = DEFENSES.get(name)
    return cls.describe(params, ctx) if hasattr(cls, "describe") else {}
