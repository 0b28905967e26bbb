"""Defenses against emergent misalignment during a fine-tune. Each is one small class returning
named loss terms (defenses/base.py), registered by name in registry.DEFENSES (a plugin package
adds one through the `em_bench.defenses` entry-point group).

A cell's defense is one of them, or a combination of several, each at its own parameters (not
tuned jointly), so a study can ask whether two defenses add up: `blockem+retain`, its components
joined by `+` in the order given, its parameters the components' with each name prefixed by
its component (`blockem.lambda`, `retain.beta`). This module is the one place that knows how a
combination is spelled; a single defense's name and parameters are as they always were.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from em_bench.errors import ConfigError, validation_problems
from em_bench.registry import DEFENSES

DEFAULT = "default"  # a parameter given as `default` is the same as a parameter left out
COMBINE = "+"  # between a combination's components: `blockem+retain`
PREFIX = "."  # between a component and its parameter: `blockem.lambda`


def components(name: str) -> tuple[str, ...]:
    """The defenses a cell's defense is made of: `(name,)` for one defense, a combination's
    components in the order given. An unknown name raises with the known ones; a combination
    repeating a defense or naming `none` raises too."""
    parts = tuple(name.split(COMBINE))
    for part in parts:  # an unknown one fails as an unknown defense does, with the known names
        DEFENSES.get(part)
    if len(parts) > 1:
        if "none" in parts:
            raise ConfigError(f"defense {name}: none cannot be combined (a combination is "
                              f"defenses applied together; the plain fine-tune is `none` alone)")
        if twice := sorted({p for p in parts if parts.count(p) > 1}):
            raise ConfigError(f"defense {name}: {', '.join(twice)} is named more than once "
                              f"(a combination takes each defense once, at its own parameters)")
        swaps = [p for p in parts if getattr(DEFENSES.get(p), "swaps_rows", False)]
        reads = [p for p in parts if getattr(DEFENSES.get(p), "reads_index", False)]
        if swaps and reads:
            raise ConfigError(f"defense {name}: {', '.join(swaps)} swaps training rows, which "
                              f"{', '.join(reads)} looks up by their index: they cannot be "
                              f"combined")
    return parts


def is_combination(name: str) -> bool:
    return len(components(name)) > 1


def parameter_fields(name: str) -> dict[str, Any]:
    """The parameters `name` takes by the names a cell (and `--set`) gives them, each with its
    pydantic field: a field's alias or name; a combination's prefixed by their component."""
    parts = components(name)
    if len(parts) > 1:
        return {f"{c}{PREFIX}{k}": f for c in parts for k, f in parameter_fields(c).items()}
    cls = DEFENSES.get(name)
    return {} if cls is None else {f.alias or n: f for n, f in cls.Params.model_fields.items()}


def _by_component(name: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A combination's parameters split by component, without their prefixes."""
    parts = components(name)
    out: dict[str, dict[str, Any]] = {c: {} for c in parts}
    for key, value in params.items():
        part = next((c for c in parts if key.startswith(c + PREFIX)), None)
        if part is None:
            raise ConfigError(
                f"defense {name}: parameter {key!r} names no component; a combination's "
                f"parameters are COMPONENT{PREFIX}NAME with COMPONENT one of {', '.join(parts)} "
                f"(e.g. {parts[0]}{PREFIX}{next(iter(parameter_fields(parts[0])), 'NAME')})")
        out[part][key.removeprefix(part + PREFIX)] = value
    return out


def check_defense(name: str, params: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """The defense's validated parameters, defaults filled in, and with `model` also the defaults
    that depend on the model (a defense's `model_defaults`): a parameter left out, given as
    `default` or given as its default value is one set of parameters, so one cell. A bad name or
    value raises. A combination's are each component's, checked as that defense's, prefixed."""
    if is_combination(name):
        return {f"{c}{PREFIX}{k}": v for c, given in _by_component(name, params).items()
                for k, v in check_defense(c, given, model).items()}
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
    """The defense objects of one cell (none for `none`; a combination's one a component, in
    its order)."""
    if is_combination(name):
        return tuple(d for c, given in _by_component(name, params).items()
                     for d in make_defenses(c, given, ctx))
    cls = DEFENSES.get(name)
    return () if cls is None else (cls(cls.Params.model_validate(params), ctx),)


def defense_inputs(name: str, params: dict[str, Any], ctx) -> dict:
    """What a cell of the defense depends on beyond its parameters (files, by content), for the
    cell hash: the defense's `inputs`, if it has one; a combination's, {component: its inputs}."""
    if is_combination(name):
        return {c: defense_inputs(c, given, ctx)
                for c, given in _by_component(name, params).items()}
    cls = DEFENSES.get(name)
    return cls.inputs(params, ctx) if hasattr(cls, "inputs") else {}


def describe_defense(name: str, params: dict[str, Any], ctx) -> dict:
    """What a cell of the defense is, for a reader of its row (blockem: form, layers,
    selection, K, lambda): the defense's `describe`, if it has one; stored beside the cell,
    never in its hash. A combination's is {component: its description} for the components that
    describe themselves (none: {}, and a row shows the parameters instead)."""
    if is_combination(name):
        described = {c: describe_defense(c, given, ctx)
                     for c, given in _by_component(name, params).items()}
        return {c: d for c, d in described.items() if d}
    cls = DEFENSES.get(name)
    return cls.describe(params, ctx) if hasattr(cls, "describe") else {}


def defense_card(name: str) -> dict:
    """What kind of defense a cell's is, for its row: its `family` (what it acts on), what it
    `needs` beyond the task's data (a combination's families joined, its needs together), and
    the parameter each component is tuned by (`strengths`; None: exempt from the rule)."""
    named = {c: DEFENSES.get(c) for c in components(name)}
    classes = [c for c in named.values() if c is not None]
    return {"family": COMBINE.join(getattr(c, "family", "?") for c in classes) or "-",
            "needs": sorted({n for c in classes for n in getattr(c, "needs", ())}),
            "strengths": {c: getattr(cls, "strength", None) for c, cls in named.items()
                          if cls is not None}}
