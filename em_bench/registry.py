"""One small registry for what a plugin package may add: tasks, defenses, judges, generation
backends and models.

Each kind has its built-ins and an entry-point group, `em_bench.<kind>`; a package adds to a
kind by naming an object in that group (pyproject.toml: `[project.entry-points."em_bench.judges"]
myjudge = "my_pkg.judge:make"`). What an entry names, per kind:

    tasks      a folder of task files, or a function returning one
    defenses   a defense class (defenses/base.py: Params, prepare, terms, finish)
    judges     make(model, store, definition) -> a judge (judge/base.py); a cell names it
               `name` or `name:model`
    backends   make(config, model, tokenizer, adapter) -> a generation backend (generate/base.py)
    models     a ModelPreset (presets.py): a Hugging Face id and its recipe

Built-ins are written as `module:attribute` too and imported only when used, so listing what
is there loads no model code. A plugin that does not load, or takes a name already taken, is
disabled with a warning that names it; everything else still works.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib import metadata
from typing import Any

from em_bench.errors import UnknownNameError
from em_bench.presets import PRESETS, BlockemDefaults, ModelPreset, ModelSettings, merge_preset

logger = logging.getLogger(__name__)


def load_reference(reference: str) -> Any:
    """The object a `module:attribute` reference names."""
    module, _, attribute = reference.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        obj = getattr(obj, part)
    return obj


def disabled(source: str, why: str) -> None:
    logger.warning("%s is disabled: %s", source, why)


class Registry:
    """The named things of one kind: the built-ins, then the installed entry points."""

    def __init__(self, kind: str, builtins: dict[str, Any], singular: str | None = None):
        self.kind, self.group = kind, f"em_bench.{kind}"
        self.singular = singular or kind.removesuffix("s")
        self.builtins = builtins  # name -> object, or a `module:attribute` to import on use
        self._plugins: tuple[tuple, dict] | None = None

    def _entries(self) -> dict[str, tuple[Any, str]]:
        """name -> (object, reference or entry point; where it comes from). The entry points
        are read again when sys.path changes (a package installed into a running session); one
        that takes a name already taken is disabled then, with its warning."""
        key = (tuple(sys.path), tuple(self.builtins))
        if self._plugins is None or self._plugins[0] != key:
            plugins = {}
            for ep in sorted(metadata.entry_points(group=self.group), key=lambda e: e.name):
                source = f"entry point {ep.name} ({ep.value}) of {self.group}"
                if ep.name in self.builtins or ep.name in plugins:
                    taken = "built-in" if ep.name in self.builtins else plugins[ep.name][1]
                    disabled(source, f"{self.singular} {ep.name!r} is already defined ({taken})")
                    continue
                plugins[ep.name] = (ep, source)
            self._plugins = (key, plugins)
        return {**{name: (obj, "built-in") for name, obj in self.builtins.items()},
                **self._plugins[1]}

    def names(self) -> list[str]:
        return list(self._entries())

    def source(self, name: str) -> str:
        return self._entries()[name][1]

    def __contains__(self, name: str) -> bool:
        return name in self._entries()

    def get(self, name: str) -> Any:
        """The object named `name`; UnknownNameError listing the known names, or (a plugin
        that cannot be imported) the same error after a warning naming the plugin."""
        entries = self._entries()
        if name not in entries:
            raise UnknownNameError(self.singular, name, list(entries))
        obj, source = entries[name]
        try:
            if isinstance(obj, metadata.EntryPoint):
                return obj.load()
            return load_reference(obj) if isinstance(obj, str) else obj
        except Exception as e:  # named, not a traceback from deep inside the plugin
            if source == "built-in":
                raise
            disabled(source, f"cannot load it ({type(e).__name__}: {e})")
            raise UnknownNameError(self.singular, name,
                                   [n for n in entries if n != name]) from None

    def listing(self) -> list[tuple[str, str, str]]:
        """(name, where it comes from, its `summary` or the first line of its docstring) of
        every name that loads: what `em-bench defenses` and `em-bench judges` print."""
        rows = []
        for name, obj in self.loaded().items():
            text = getattr(obj, "summary", None) or (obj.__doc__ if obj is not None else "")
            rows.append((name, self.source(name), (text or "").strip().split("\n")[0]))
        return rows

    def loaded(self) -> dict[str, Any]:
        """Every name's object; a plugin that does not load is left out (with its warning)."""
        out = {}
        for name in self.names():
            try:
                out[name] = self.get(name)
            except UnknownNameError:
                continue
        return out


TASKS = Registry("tasks", {})  # the built-in tasks are the package's tasks/ folder (tasks.py)
DEFENSES = Registry("defenses", {
    "none": None,  # the plain fine-tune: no class, no parameters
    "retain": "em_bench.defenses.retain:Retain",
    "kl": "em_bench.defenses.kl:KL",
    "blockem": "em_bench.defenses.blockem:BlockEM",
    "inoculation": "em_bench.defenses.inoculation:Inoculation",
    "interleave": "em_bench.defenses.interleave:Interleave",
    "steering": "em_bench.defenses.steering:Steering",
    "caft": "em_bench.defenses.caft:CAFT",
    "safelora": "em_bench.defenses.safelora:SafeLoRA",
    "ldifs": "em_bench.defenses.ldifs:LDIFS",
    "early_stop": "em_bench.defenses.early_stop:EarlyStop",
})
JUDGES = Registry("judges", {
    "organism": "em_bench.organism.judge:make_judge",
    "openai": "em_bench.judge.llm:make_judge",
})
BACKENDS = Registry("backends", {
    "hf": "em_bench.generate.hf:make_backend",
    "vllm": "em_bench.generate.vllm_backend:make_backend",
    "openai": "em_bench.generate.openai_api:make_backend",
})
MODELS = Registry("models", PRESETS)


def preset_of(model: str) -> ModelPreset | None:
    """The preset a model runs under, built-in or a plugin's: by its name, or by the hub id a
    name resolved to (a cell names its model by the hub id)."""
    if model in MODELS:
        return MODELS.get(model)
    return next((p for p in map(MODELS.get, MODELS.names())
                 if getattr(p, "hub_id", None) == model), None)


def model_settings(model: str, **flags: Any) -> ModelSettings:
    """What `model` loads and how it trains and samples: its preset's, under `flags`
    (presets.merge_preset's); the same for every command, a tuning and a study."""
    return merge_preset(model, preset_of(model), **flags)


def blockem_of(model: str) -> BlockemDefaults | None:
    """A model's BLOCK-EM defaults (its preset's), or None (the organism has its own)."""
    return getattr(preset_of(model), "blockem", None)


def recipe_of(model: str) -> dict[str, Any]:
    """The TrainConfig fields a model's cells train with before any flag: its preset's ({}
    without one, e.g. the organism)."""
    return model_settings(model).train
