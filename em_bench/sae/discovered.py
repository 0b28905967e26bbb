"""Which latent sets a model has when a defense names none: a discovery's settings, and its sets,
found once and cached by those settings (the shipped organism carries its default ones).

A discovery is named by its form and selection, its layers and K; the rest (the probe task,
discovery's seed and version, the organism's SAE settings) is fixed here, so two cells that ask
for the same discovery share its sets, and a row can say exactly which method it is:

- form `directions`: the top-K principal directions of the probe's shift (`principal-shift`,
  the default, at every layer, K 5: the prototype's working configuration), or K random
  directions (`random`, the ablation);
- form `sae`: the paper's SAE latents at one layer (by default the middle block), chosen by the
  three-stage screen (`three-stage`), or its ablations, the top-K by activation shift
  (`top-delta`) and K random latents (`random`).

The organism's SAEs are its own (shipped). A real model's come from its preset
(presets.BlockemDefaults: a pretrained sae-lens SAE, or one em-bench trains on the model), with
its hook point, K and screen settings, and the screen judges with the cell's judge; such a
discovery is cached by model identity, SAE, layer, probe task, seed and judge.
"""

from __future__ import annotations

import logging
from pathlib import Path

from em_bench.config import canonical_hash
from em_bench.errors import ConfigError
from em_bench.models import is_organism, model_identity, resolve_model_path
from em_bench.paths import cache_dir
from em_bench.registry import recipe_of
from em_bench.sae.discover import (
    DEFAULT_PROBE_TASK,
    DISCOVERY_VERSION,
    discover_directions,
    discover_sae_sets,
    nothing_kept,
)
from em_bench.tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)

SELECTIONS = {"directions": ("principal-shift", "random"),
              "sae": ("three-stage", "top-delta", "random")}
DEFAULT_K = {"directions": 5, "sae": 20}


def discovery_settings(model: str, form: str = "directions", selection: str | None = None,
                       layers: list[int] | None = None, k: int | None = None,
                       judge: str = "organism", probe_task: str = DEFAULT_PROBE_TASK) -> dict:
    """Everything that determines a discovery's sets (its cache key); what is not given takes
    the form's default (a real model's SAE form: its preset's). The default discovery's
    settings are what the shipped organism's default sets were found with. `probe_task`: the
    fine-tune whose shift is read (the organism's finance; a real model's own task)."""
    from transformers import AutoConfig

    from em_bench.registry import blockem_of

    if form not in SELECTIONS:
        raise ConfigError(f"latent form {form!r}: expected one of {', '.join(SELECTIONS)}")
    selection = selection or SELECTIONS[form][0]
    if selection not in SELECTIONS[form]:
        raise ConfigError(f"the {form} form's selection is one of "
                          f"{', '.join(SELECTIONS[form])}, not {selection!r}")
    own = blockem_of(model)
    if form == "sae" and not is_organism(model) and own is None:
        raise ConfigError(f"{model} has no default SAE: discover its latents with `em-bench "
                          f"discover --sae ...` and give the sets as latents files")
    n_layers = AutoConfig.from_pretrained(resolve_model_path(model)).num_hidden_layers
    sae_layers = [own.layer] if own else [n_layers // 2]
    layers = sorted(set(layers)) if layers else (
        list(range(n_layers)) if form == "directions" else sae_layers)
    if bad := [x for x in layers if not 0 <= x < n_layers]:
        raise ConfigError(f"latent layers {bad}: {model} has blocks 0-{n_layers - 1}")
    default_k = own.k if own and form == "sae" else DEFAULT_K[form]
    settings = {"model": model_identity(model), "probe_task": probe_task, "form": form,
                "layers": layers, "k": k or default_k, "seed": 0,
                "discovery_version": DISCOVERY_VERSION}
    if (form, selection) != ("directions", "principal-shift"):  # the default's key stays as shipped
        settings["selection"] = selection
    if not is_organism(model):  # its probe trains under its preset's recipe (probe_budget)
        settings["probe_train"] = recipe_of(model)
    if form == "sae" and own is None:
        from em_bench.sae.training import DEFAULTS

        settings["sae"] = DEFAULTS.model_dump(mode="json")  # the organism's SAEs, trained so
    elif form == "sae":
        from em_bench.sae.model_sae import MODEL_DEFAULTS

        settings["sae"] = own.sae or {"trained": MODEL_DEFAULTS.model_dump(mode="json")}
        settings["screen"] = dict(own.screen)
        if selection == "three-stage":
            settings["judge"] = judge
    return settings


def default_settings(model: str) -> dict:
    """The model's default discovery: the direction form at every layer, K 5."""
    return discovery_settings(model)


def selection_of(settings: dict) -> str:
    return settings.get("selection", SELECTIONS[settings["form"]][0])


def discovered_sets(model: str, settings: dict, task: TaskSpec | None = None) -> list[Path]:
    """The latent-set files of `settings`' discovery on `model`: the shipped organism's, else
    the cache's, else discovered now and cached. `task`: the probe task when it is at hand (a
    plugin's, which no name finds)."""
    from em_bench.organism.artifact import shipped_latents

    form, selection = settings["form"], selection_of(settings)
    folder = shipped_latents(model, settings) if is_organism(model) else None
    folder = folder or cache_dir() / "latents" / canonical_hash(settings)
    # the file names discover_directions and discover_sae_sets write
    prefix = "directions" if selection == "principal-shift" else f"{form}_{selection}"
    paths = [folder / f"{prefix}_L{layer}.json" for layer in settings["layers"]]
    if found := next(filter(None, map(nothing_kept, paths)), None):
        raise found  # a screen that kept nothing, found before: not rerun
    if not all(p.is_file() for p in paths):
        logger.info("discovering %s latent sets of %s (%s; cached in %s)", form, model,
                    selection, folder)
        if task is None or task.name != settings["probe_task"]:
            task = get_task(settings["probe_task"])
        layers, k, seed = settings["layers"], settings["k"], settings["seed"]
        if form == "directions":
            discover_directions(model, task, layers, k, seed, folder, selection=selection)
        elif is_organism(model):
            discover_sae_sets(model, task, layers, folder, k=k, selection=selection, seed=seed)
        else:
            discover_sae_sets(model, task, layers, folder, sae_ref=_sae_ref(model, settings),
                              judge=settings.get("judge"), k=k, selection=selection, seed=seed,
                              **settings["screen"])
    return paths


def _sae_ref(model: str, settings: dict) -> str:
    """A real model's SAE: its preset's pretrained one, or the one em-bench trains on it."""
    if isinstance(settings["sae"], str):
        return settings["sae"]
    from em_bench.sae.model_sae import ensure_model_sae

    (layer,) = settings["layers"]  # a trained SAE reads one hook point
    return str(ensure_model_sae(model, layer))


def default_latent_sets(model: str) -> list[Path]:
    """The model's default latent sets (the shipped organism's, or discovered on first use)."""
    return discovered_sets(model, default_settings(model))
