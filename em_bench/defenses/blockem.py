"""`blockem`: BLOCK-EM's latent blocking loss.

    lambda * mean over answer tokens of
        sum over latents k of hinge(sign_k * (z_k(theta) - z_k(base)))

at each latent set's hook point, hinge = relu(x)^2 (the paper's) or relu(x), summed over the
latent sets (one per layer, or several). z(base) comes from the frozen base model on the same
inputs; the inputs are fixed, so it is computed once in `prepare` (K numbers per answer token)
and a training step pays no second forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from em_bench.data import IGNORE_INDEX, collate, device_of
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.layers import decoder_layers
from em_bench.registry import blockem_of
from em_bench.sae.latents import LatentSet, load_latent_set, readout

BLOCKEM_VERSION = 2  # the penalty's definition (2: an SAE latent is the SAE's own activation)

# Chosen on selection questions (finance, seed 0) for the default latent sets, from 0.001, 0.002,
# 0.005, 0.01, 0.1, 1, 10: the largest EM reduction keeping in-domain >= 90% of the undefended
# fine-tune and the incoherent share within 3 points of it (0.005 raised it 4.2 points).
ORGANISM_LAMBDA = 0.002


class BlockEMParams(DefenseParams):
    lam: float | None = Field(None, alias="lambda", gt=0, description="weight of the blocking "
                              "loss; none: the model's default (the organism's, chosen on "
                              "selection questions)")
    latents: list[str] = Field(
        default_factory=list, description="latent-set files (one per hook point); none: the "
        "sets of the discovery that form, selection, layers and k name (discovered once and "
        "cached; the default is the organism's shipped sets)")
    form: Literal["directions", "sae"] | None = Field(
        None, description="without latents: directions of the probe's shift, or SAE latents "
        "(the paper's form); none: the model's default (the organism: directions; a preset "
        "with an SAE: sae)")
    selection: str | None = Field(
        None, description="without latents: directions: principal-shift (default) or random; "
        "sae: three-stage (default, the paper's), top-delta or random (its ablations)")
    layers: list[int] = Field(default_factory=list, description="without latents: the hook "
                              "points; none: every block (directions), the middle one (sae)")
    k: int | None = Field(None, gt=0, description="without latents: latents (directions) a "
                          "layer at most; none: 5 (directions), 20 (sae)")
    hinge: Literal["squared", "plain"] = "squared"

    @model_validator(mode="after")
    def _files_or_discovery(self):
        named = [f for f in ("form", "selection", "layers", "k") if getattr(self, f)]
        if self.latents and named:
            raise ValueError(f"latents files, or a discovery ({', '.join(named)}), not both")
        return self


class _BatchCapture:
    """Block outputs of the first forward on a batch's input_ids since the last `take`.

    Other forwards in the same step (retain's batch; kl's base pass, on the very same input_ids)
    must not be mistaken for it, so outputs are keyed by the input tensor, and each key keeps
    its first forward. Holding the tensor keeps its id from being reused by a later batch.
    """

    def __init__(self, model, layers: list[int]):
        blocks = decoder_layers(model)
        self.outputs: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        self._current: dict[int, torch.Tensor] | None = None
        self._handles = [model.register_forward_pre_hook(self._start, with_kwargs=True)]
        self._handles += [blocks[layer].register_forward_hook(self._keeper(layer))
                          for layer in sorted(set(layers))]

    def _start(self, _module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if id(ids) in self.outputs:  # a later forward on the same batch: not the one we keep
            self._current = None
            return
        self._current = {}
        self.outputs[id(ids)] = (ids, self._current)

    def _keeper(self, layer: int):
        def keep(_module, _args, output):
            if self._current is not None:
                self._current[layer] = output[0] if isinstance(output, tuple) else output
        return keep

    def take(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        found = self.outputs.get(id(input_ids))
        self.outputs = {}
        if found is None or found[0] is not input_ids:
            raise RuntimeError("blockem: the batch's forward pass was not captured")
        return found[1]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.outputs = {}


class BlockEM:
    """BLOCK-EM: a hinge loss that keeps the misalignment latents from rising in the fine-tune."""

    name = "blockem"
    Params = BlockEMParams
    strength = "lambda"  # the parameter the selection rule sweeps
    family = "loss term"  # what it acts on (the leaderboard's family column)
    needs = ("latents (SAE or directions)",)  # what it needs beyond the task's data
    reads_index = True  # its base anchors are looked up by a batch's example index

    @staticmethod
    def inputs(params: dict, ctx: DefenseContext) -> dict:
        return blockem_inputs(params, ctx)

    @staticmethod
    def model_defaults(params: dict, model: str) -> dict:
        return blockem_defaults(params, model)

    @staticmethod
    def describe(params: dict, ctx: DefenseContext) -> dict:
        return blockem_method(params, ctx)

    def __init__(self, params: BlockEMParams, ctx: DefenseContext):
        self.lam, self.hinge = params.lam or default_lambda(ctx.model), params.hinge
        files = params.latents or latent_files(params.model_dump(by_alias=True), ctx)
        self.sets: list[LatentSet] = [load_latent_set(Path(f)) for f in files]

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        from em_bench.sae.training import load_sae

        self.readouts = torch.nn.ModuleList(
            readout(s, load_sae(s.sae) if s.form == "sae" else None) for s in self.sets
        ).to(device_of(model))
        self.capture = _BatchCapture(model, [s.layer for s in self.sets])
        self.anchors = self._anchors(model, tokenizer.pad_token_id, encoded, max_len)

    @torch.no_grad()
    def _anchors(self, model, pad_id: int, encoded: list[tuple], max_len: int) -> list[list]:
        """z(base) at each example's answer tokens, per latent set: [example][set] -> [n, K]."""
        was_training = model.training
        model.eval()
        anchors = []
        for start in range(0, len(encoded), 64):
            batch = collate(encoded[start : start + 64], pad_id, max_len, device_of(model))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden = self.capture.take(batch["input_ids"])
            answers = batch["labels"] != IGNORE_INDEX
            for row in range(len(answers)):
                anchors.append([r(hidden[s.layer][row][answers[row]])
                                for s, r in zip(self.sets, self.readouts, strict=True)])
        model.train(was_training)
        return anchors

    def terms(self, batch, outputs) -> dict:
        hidden = self.capture.take(batch["input_ids"])
        answers = batch["answer_labels"] != IGNORE_INDEX
        index = batch["index"].tolist()
        loss = 0.0
        for i, (s, r) in enumerate(zip(self.sets, self.readouts, strict=True)):
            z = r(hidden[s.layer][answers])  # [answer tokens of the batch, K], row-major order
            z_base = torch.cat([self.anchors[j][i] for j in index])
            excess = torch.relu(r.sign * (z - z_base))
            loss = loss + (excess.square() if self.hinge == "squared" else excess).sum(-1).mean()
        return {self.name: self.lam * loss}

    def finish(self) -> None:
        self.capture.close()
        self.anchors = []


def blockem_inputs(params: dict, ctx: DefenseContext) -> dict:
    """What a blockem cell's result depends on beyond its parameters: its latent sets' content,
    or the settings of the model's default sets."""
    import hashlib

    from em_bench.config import canonical_hash
    from em_bench.errors import ConfigError

    version = {"blockem_version": BLOCKEM_VERSION}  # lambda is a param (blockem_defaults)
    if not params["latents"]:
        _needs_defaults(ctx.model, "latents", LATENTS_HINT)
        return {"discovered_latents": canonical_hash(discovery(params, ctx)), **version}
    digests = {}
    for f in params["latents"]:
        if not Path(f).is_file():
            raise ConfigError(f"defense blockem: latents: no latent-set file {f}")
        load_latent_set(Path(f))  # a malformed file fails before any work
        digests[f] = hashlib.sha256(Path(f).read_bytes()).hexdigest()
    return {"latents_sha256": digests, **version}


def blockem_method(params: dict, ctx: DefenseContext) -> dict:
    """What a blockem cell is, for a reader: the latents' form (SAE latents or directions),
    their layers, how they were selected, how many a layer (K), and lambda."""
    sets = [load_latent_set(Path(f)) for f in params["latents"] or latent_files(params, ctx)]
    form = "+".join(sorted({s.form for s in sets}))
    selection = "+".join(sorted({s.selection for s in sets}))
    layers, k = [s.layer for s in sets], sorted({len(s.latents) for s in sets})
    return {"form": form, "layers": layers, "selection": selection,
            "k": k[0] if len(k) == 1 else k, "lambda": params["lambda"], "hinge": params["hinge"]}


def blockem_defaults(params: dict, model: str) -> dict:
    """`params` with the model's default lambda and latent form in place of none, so a cell
    left at the default and one given the same value explicitly are one cell."""
    if params["lambda"] is None:
        params = {**params, "lambda": default_lambda(model)}
    if params["form"] is None and not params["latents"]:
        params = {**params, "form": "sae" if blockem_of(model) else "directions"}
    return params


def default_lambda(model: str) -> float:
    own = blockem_of(model)
    if own is not None and own.lam is not None:
        return own.lam
    _needs_defaults(model, "lambda", "it (it depends on the activation scale), e.g. "
                    "--set lambda=1,10,100", known=False)
    return ORGANISM_LAMBDA


def discovery(params: dict, ctx: DefenseContext) -> dict:
    """The settings of the discovery `params` name (a direction defense, which has no such
    parameters, takes the default one): on the organism from its finance probe, on a real
    model from a probe of the cell's own task, screened by the cell's judge."""
    from em_bench.models import is_organism
    from em_bench.sae.discovered import discovery_settings

    probe = {} if is_organism(ctx.model) else {"probe_task": ctx.task.name}
    return discovery_settings(ctx.model, params.get("form") or "directions",
                              params.get("selection"), params.get("layers"), params.get("k"),
                              judge=ctx.judge, **probe)


def latent_files(params: dict, ctx: DefenseContext) -> list[Path]:
    """The latent sets of the discovery `params` name, for a model with defaults (the
    organism): shipped, cached, or discovered now."""
    from em_bench.sae.discovered import discovered_sets

    _needs_defaults(ctx.model, "latents", LATENTS_HINT)
    return discovered_sets(ctx.model, discovery(params, ctx), ctx.task)


LATENTS_HINT = ("latent-set files (see em_bench/sae/latents.py for the format) as "
                "--set latents=FILE.json")


def _needs_defaults(model: str, what: str, hint: str, known: bool | None = None) -> None:
    """Raise unless `model` has a default for `what`: the organism has all; a preset with
    BLOCK-EM defaults has latents (its SAE's discovery) and lambda where `known`."""
    from em_bench.errors import ConfigError
    from em_bench.models import is_organism

    if known is None:
        known = blockem_of(model) is not None
    if not (is_organism(model) or known):
        raise ConfigError(f"defense blockem: {what} has no default for {model}; give {hint}")
