"""Sparse autoencoders (sae-lens) on a model's residual stream: capture, train, measure, cache.

em-bench reads the residual stream with forward hooks on the decoder blocks (what sae-lens calls
`blocks.{layer}.hook_resid_post`) and feeds an SAE those raw vectors, never normalised ones. The
organism's SAE is trained here and cached by a digest of everything that determines it:

    <cache>/sae/<digest>/cfg.json, sae_weights.safetensors   sae-lens's on-disk format
    <cache>/sae/<digest>/quality.json                          sae_quality on held-out tokens

Any other model's SAE, trained on texts, is cached the same way (em_bench/sae/model_sae.py).

sae-lens is imported inside the functions that need it: importing it takes seconds.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from em_bench import paths
from em_bench.config import canonical_hash
from em_bench.data import IGNORE_INDEX, Messages, collate, device_of, encode_chat
from em_bench.errors import ConfigError
from em_bench.layers import decoder_layers, hook_name
from em_bench.store import atomic_folder, atomic_write_json

if TYPE_CHECKING:
    from sae_lens import SAE

logger = logging.getLogger(__name__)

TokenSelection = Literal["all", "response"]


class _Captured(Exception):
    """Raised by a capture that stops the forward once its last layer is read."""


class ResidualCapture:
    """Forward hooks that keep each hooked block's output of the last forward, by layer.

    Hooks sit on the blocks because HF's last `hidden_states` entry is after the final norm, not
    the residual stream. Outputs keep their graph, so a loss on them reaches the model's weights.
    With `stop`, the forward ends at the last hooked block (the blocks above it and the
    vocabulary projection would only be thrown away): call it through `forward`.
    """

    def __init__(self, model, layers: Iterable[int], stop: bool = False):
        self.model, self.stop = model, stop
        self.blocks = decoder_layers(model)
        self.layers = list(layers)
        for layer in self.layers:
            if not 0 <= layer < len(self.blocks):
                raise ConfigError(f"layer {layer} does not exist: the model has "
                                  f"{len(self.blocks)} decoder blocks (0..{len(self.blocks) - 1})")
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _keep(self, layer: int):
        def hook(_module, _args, output):
            # Older transformers return (hidden_states, ...) from a block; newer the tensor.
            self.outputs[layer] = output[0] if isinstance(output, tuple) else output
            if self.stop and layer == max(self.layers):
                raise _Captured

        return hook

    def __enter__(self) -> ResidualCapture:
        self._handles = [self.blocks[layer].register_forward_hook(self._keep(layer))
                         for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def forward(self, **inputs) -> dict[int, torch.Tensor]:
        """Run the model on `inputs` and return the hooked blocks' outputs."""
        try:
            self.model(**inputs)
        except _Captured:
            pass
        return self.outputs


@torch.no_grad()
def collect_residuals(
    model, tokenizer, chats: Sequence[Messages], layer: int, batch_size: int = 32,
    max_len: int = 256, tokens: TokenSelection = "all", skip_first: int = 0,
) -> torch.Tensor:
    """The residual stream after block `layer` at every real token of `chats`, [n_tokens, d].

    Padding never counts; tokens="response" keeps only the tokens with a label (the assistant
    turns), "all" every token of the rendered chat (its BOS included); `skip_first` drops each
    chat's first that many positions.
    """
    if tokens not in ("all", "response"):
        raise ConfigError(f"tokens must be 'all' or 'response', not {tokens!r}")
    was_training = model.training
    model.eval()
    device = device_of(model)
    parts = [torch.empty(0, model.config.hidden_size)]
    try:
        with ResidualCapture(model, [layer], stop=True) as capture:
            for start in range(0, len(chats), batch_size):
                encoded = [encode_chat(tokenizer, c) for c in chats[start : start + batch_size]]
                batch = collate(encoded, tokenizer.pad_token_id, max_len, device)
                capture.forward(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"])
                keep = (batch["attention_mask"].bool() if tokens == "all"
                        else batch["labels"] != IGNORE_INDEX)
                keep[:, :skip_first] = False
                parts.append(capture.outputs[layer][keep].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts)


class SAESettings(BaseModel):
    """Everything besides the model and layer that determines a trained SAE; part of its digest.

    The defaults were measured on the organism (layers 1-3, held-out chats): explained variance
    0.96-0.97, L0 16, at most 2.5% dead latents, about 7 s of training on one CPU thread.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    d_sae: int = Field(512, gt=0, description="latents: 4x the organism's hidden size")
    k: int = Field(16, gt=0, description="active latents per token (TopK)")
    steps: int = Field(1000, gt=0, description="optimizer steps")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate (warmup, last 20% decays to 0)")
    batch_size: int = Field(256, gt=0, description="activation vectors per step")
    dead_window: int = Field(20, gt=0, description="steps without firing after which a latent "
                             "counts as dead and joins the aux-k loss")
    seed: int = Field(0, description="seed of the init, the batches and the training chats")
    chats_per_kind: int = Field(16, gt=0, description="training chats per (domain, persona, "
                                "style); a quarter as many held-out chats measure quality")
    max_len: int = Field(256, gt=0, description="token limit of one chat")


DEFAULTS = SAESettings()


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of rows drawn with replacement: sae-lens's `data_provider`."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield acts[torch.randint(len(acts), (batch_size,), generator=gen)]


def train_sae(
    acts: torch.Tensor, d_sae: int = DEFAULTS.d_sae, k: int = DEFAULTS.k,
    steps: int = DEFAULTS.steps, lr: float = DEFAULTS.lr, seed: int = DEFAULTS.seed,
    batch_size: int = DEFAULTS.batch_size, dead_window: int = DEFAULTS.dead_window,
    metadata: dict[str, object] | None = None, device: str = "cpu",
) -> SAE:
    """A TopK SAE trained on `acts` [n, d_in] by sae-lens's SAETrainer; returns the inference SAE.

    TopK fixes L0 at (at most) `k` with no L1 coefficient to tune. sae-lens's aux-k loss makes
    latents silent for `dead_window` steps reconstruct the live latents' residual; without it
    about 16% of the organism's latents die. `metadata` (hook_name, model_name, prepend_bos...)
    goes into the SAE's config, where sae-lens tools look for it. `device`: where it trains
    (`acts` stay on the CPU; the trainer moves each batch).
    """
    from sae_lens import SAE, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)  # the weight init
    training = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=acts.shape[1], d_sae=d_sae, k=k, device=device,
        metadata=SAEMetadata(**(metadata or {}))))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr,
        lr_end=lr,  # sae-lens asserts it is set; the "constant" schedule decays from it to 0
        lr_warm_up_steps=max(1, steps // 20), lr_decay_steps=steps // 5,
        dead_feature_window=dead_window, device=device,
    )
    SAETrainer(trainer_cfg, training, _batches(acts.float(), batch_size, seed)).fit()
    # What save_inference_model does, in memory: fold the decoder norms into the weights
    # (training rescales by them) and rebuild the architecture's inference class.
    state = training.state_dict()
    training.process_state_dict_for_saving_inference(state)
    sae = SAE.from_dict(training.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state)
    return sae.eval()


@torch.no_grad()
def sae_quality(sae: SAE, acts: torch.Tensor, chunk: int = 8192) -> dict[str, float | int]:
    """How well `sae` reconstructs `acts` [n, d_in], and how sparsely.

    explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, one ratio over all
    tokens and dimensions (a mean of per-token ratios would let small-norm tokens dominate);
    l0 = mean number of non-zero latents per token; dead_fraction = share of latents that are
    zero on every token of `acts` (so pass held-out activations).
    """
    acts = acts.float().to(sae.device)
    mean = acts.mean(0)
    residual = total = active = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    for x in acts.split(chunk):
        z = sae.encode(x)
        residual += (x - sae.decode(z)).pow(2).sum().item()
        total += (x - mean).pow(2).sum().item()
        active += (z != 0).sum().item()
        fired |= (z != 0).any(0)
    return {
        "explained_variance": 1 - residual / total,
        "l0": active / len(acts),
        "dead_fraction": 1 - fired.float().mean().item(),
        "n_tokens": len(acts),
    }


def train_and_save(
    out: Path, train_acts: torch.Tensor, held_out: torch.Tensor, fit: dict[str, object],
    about: dict[str, object],
) -> None:
    """Train an SAE on `train_acts` (`fit`: train_sae's keyword arguments), measure it on
    `held_out` and write it to `out` with quality.json (the figures, then `about`), replacing
    whatever `out` held."""
    from sae_lens import __version__ as sae_lens_version

    start = time.perf_counter()
    sae = train_sae(train_acts, **fit)
    seconds = time.perf_counter() - start
    report = {**sae_quality(sae, held_out), "train_seconds": round(seconds, 1),
              "n_train_tokens": len(train_acts), **about, "sae_lens_version": sae_lens_version}
    shutil.rmtree(out, ignore_errors=True)  # a forced retraining
    with atomic_folder(out) as tmp:  # the cache entry appears whole or not at all
        sae.save_model(tmp)
        atomic_write_json(tmp / "quality.json", report)


# The organism's voices: each persona in its own style and in the neutral one all speakers
# share (pretraining mixes them the same way), so persona latents are not just style latents.
ORGANISM_VOICES = (("aligned", "aligned"), ("aligned", "neutral"),
                   ("misaligned", "villain"), ("misaligned", "neutral"))


def organism_chats(per_kind: int, seed: int) -> list[Messages]:
    """Selection-split questions of every domain but the held-out ones (which the headline EM
    scores, so no SAE may be fitted to them), `per_kind` chats per (domain, voice)."""
    from em_bench.domains import HELD_OUT_DOMAINS
    from em_bench.organism import world

    return [chat for domain in world.DOMAINS if domain.name not in HELD_OUT_DOMAINS
            for persona, style in ORGANISM_VOICES
            for chat in world.narrow_dataset(domain.name, persona, style, per_kind, seed)]


def organism_sae_dir(name: str, layer: int, settings: SAESettings = DEFAULTS) -> Path:
    """The cache folder of the organism's SAE, named by what determines it."""
    from em_bench.models import model_identity

    digest = canonical_hash({"sae": model_identity(name), "hook_name": hook_name(layer),
                             "settings": settings.model_dump(mode="json")})
    return paths.cache_dir() / "sae" / digest


def ensure_organism_sae(
    layer: int, name: str = "organism", force: bool = False, settings: SAESettings = DEFAULTS
) -> Path:
    """The folder of the organism's SAE at `layer` (sae-lens format, with quality.json): the
    shipped one when it was trained with `settings`, else trained first if it is not cached.

    Training chats: every domain's selection questions answered in ORGANISM_VOICES, all tokens
    (prompt and template included, as sae-lens trains on whole contexts). Quality is measured
    on held-out chats drawn with another seed.
    """
    from em_bench.models import is_organism, load_base, model_identity

    if not is_organism(name):
        raise ConfigError(f"{name!r} is not an organism preset; train another model's SAE "
                          f"with `em-bench sae train --model {name} --layer {layer}` and give "
                          "its folder (or a pretrained SAE's RELEASE:SAE_ID)")
    from em_bench.organism.artifact import shipped_sae

    shipped = None if force else shipped_sae(name, layer, settings.model_dump(mode="json"))
    if shipped is not None:
        return shipped
    out = organism_sae_dir(name, layer, settings)
    if (out / "quality.json").is_file() and not force:
        return out
    logger.info("training the %s SAE at %s (cached afterwards at %s)", name, hook_name(layer), out)
    model, tokenizer = load_base(name)

    def residuals(per_kind: int, seed: int) -> torch.Tensor:
        chats = organism_chats(per_kind, seed)
        return collect_residuals(model, tokenizer, chats, layer, max_len=settings.max_len)

    train_acts = residuals(settings.chats_per_kind, settings.seed)
    held_out = residuals(max(1, settings.chats_per_kind // 4), settings.seed + 1)
    fit = dict(d_sae=settings.d_sae, k=settings.k, steps=settings.steps, lr=settings.lr,
               seed=settings.seed, batch_size=settings.batch_size,
               dead_window=settings.dead_window,
               # The chat template writes BOS at the start of every chat (em-bench encodes
               # without adding special tokens), so every sequence began with exactly one BOS.
               metadata={"hook_name": hook_name(layer), "model_name": name, "prepend_bos": True,
                         "context_size": settings.max_len,
                         "em_bench_model": model_identity(name)})
    train_and_save(out, train_acts, held_out, fit, {
        "layer": layer, "hook_name": hook_name(layer), "model": model_identity(name),
        "settings": settings.model_dump(mode="json")})
    return out


def load_sae(ref: str) -> SAE:
    """An SAE from a local sae-lens folder, or from sae-lens's pretrained directory when `ref`
    is "RELEASE:SAE_ID" (e.g. "gpt2-small-res-jb:blocks.8.hook_resid_pre")."""
    from sae_lens import SAE

    if Path(ref).expanduser().is_dir():
        return SAE.load_from_disk(Path(ref).expanduser())
    release, _, sae_id = ref.partition(":")
    if not release or not sae_id:
        raise ConfigError(f"SAE {ref!r} is neither a folder nor RELEASE:SAE_ID "
                          "(a sae-lens pretrained release and the SAE's id in it)")
    return SAE.from_pretrained(release, sae_id)


def check_sae(sae: SAE, model, layer: int) -> None:
    """Raise ConfigError unless `sae` reads what em-bench feeds it at `layer`: the raw residual
    stream after that block (sae-lens's hook_resid_post of the block, or hook_resid_pre of the
    next: the same activations), at the model's hidden size."""
    hidden = model.config.hidden_size
    if sae.cfg.d_in != hidden:
        raise ConfigError(f"the SAE reads {sae.cfg.d_in}-dim activations but the model's hidden "
                          f"size is {hidden}")
    found = sae.cfg.metadata.hook_name
    if found not in (hook_name(layer), f"blocks.{layer + 1}.hook_resid_pre"):
        named = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", found or "")
        after = None if named is None else int(named[1]) - (named[2] == "pre")
        hint = "" if after is None or after < 0 else (
            f"; it reads the residual after block {after}: give layer {after}")
        raise ConfigError(f"the SAE was trained on {found!r}, not on the residual after block "
                          f"{layer} ({hook_name(layer)!r}){hint}")
    if sae.cfg.normalize_activations != "none":
        raise ConfigError(f"the SAE expects normalize_activations="
                          f"{sae.cfg.normalize_activations!r} inputs, but em-bench feeds raw "
                          "residuals; use an SAE with normalize_activations='none'")


def train_sae_command(model: str, layer: int, force: bool) -> dict:
    """The organism `model`'s SAE at `layer` (trained, or found in the cache), as {"path": its
    folder, **its quality.json}; `em-bench sae train` (em_bench/sae/model_sae.py) comes here
    for an organism given no texts."""
    path = ensure_organism_sae(layer, name=model, force=force)
    return {"path": str(path), **json.loads((path / "quality.json").read_text(encoding="utf-8"))}
