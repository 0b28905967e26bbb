"""An SAE for any model em-bench loads (a Hugging Face hub id, a local model folder, or an
organism given other texts): what `em-bench sae train` builds.

It is the organism's kind of SAE (training.train_sae: TopK, sae-lens) on the model's own
residual stream after block L, over texts (corpus.py: a file, else em-bench's own chats), its
quality measured on the held-out texts. Cached by a digest of everything that determines it:

    <cache>/sae/<digest>/   sae-lens's folder (SAE.load_from_disk) and quality.json

The organism's own SAE (its world's chats, shipped with it) stays training.ensure_organism_sae.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from em_bench import paths
from em_bench.config import canonical_hash
from em_bench.data import Messages, device_of, encode_chat
from em_bench.errors import DataError
from em_bench.layers import hook_name
from em_bench.sae.corpus import at_most, default_texts, read_texts, split_held_out, texts_digest
from em_bench.sae.training import (
    DEFAULTS,
    collect_residuals,
    train_and_save,
    train_sae_command,
)

logger = logging.getLogger(__name__)


class ModelSAESettings(BaseModel):
    """Everything besides the model, layer and texts that determines its SAE; part of the
    digest. Training is the organism's (DEFAULTS); the size follows the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 4: on SmolLM2's block 15 and the default texts, 8x left a quarter of the latents dead
    # (25.5%, against 9.0% at 4x; explained variance 0.967 and 0.960)
    latents_per_dim: int = Field(4, gt=0, description="d_sae: this many times the model's "
                                 "hidden size")
    k: int = Field(32, gt=0, description="active latents per token (TopK)")
    steps: int = Field(DEFAULTS.steps, gt=0, description="optimizer steps")
    lr: float = Field(DEFAULTS.lr, gt=0, description="Adam learning rate")
    batch_size: int = Field(DEFAULTS.batch_size, gt=0, description="activations per step")
    dead_window: int = Field(DEFAULTS.dead_window, gt=0, description="steps without firing "
                             "after which a latent joins the aux-k loss")
    seed: int = Field(DEFAULTS.seed, description="seed of the init, batches and text sample")
    max_len: int = Field(DEFAULTS.max_len, gt=0, description="token limit of one text")
    max_texts: int = Field(2000, gt=1, description="texts used at most: a seeded sample of a "
                           "larger file (every token's residual is held in memory)")
    held_out_every: int = Field(5, ge=2, description="every n-th text is held out to measure "
                                "the SAE, never trained on")


MODEL_DEFAULTS = ModelSAESettings()


def model_sae_dir(model: str, layer: int, texts: list[Messages],
                  settings: ModelSAESettings = MODEL_DEFAULTS) -> Path:
    """The cache folder of `model`'s SAE at `layer` on `texts`, named by what determines it."""
    from em_bench.models import model_identity

    # "skips": an SAE of an earlier em-bench, fitted with the shared opening, is not this one
    digest = canonical_hash({"sae": model_identity(model), "hook_name": hook_name(layer),
                             "settings": settings.model_dump(mode="json"),
                             "texts": texts_digest(texts), "skips": "shared opening"})
    return paths.cache_dir() / "sae" / digest


def _starts_with_bos(tokenizer, chat: Messages) -> bool:
    """Whether the model's chat template opens a chat with its BOS token (sae-lens's
    prepend_bos: em-bench encodes without adding special tokens, so only the template adds
    one)."""
    ids, _ = encode_chat(tokenizer, chat)
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


def shared_opening(tokenizer, texts: list[Messages]) -> int:
    """How many leading tokens the SAE skips in every text: those all `texts` share (the
    template's opening and any default system prompt: one context repeated, not data), and
    at least the first, an attention sink (on SmolLM2 its residual's norm is ~150x the
    others', so it would own both the loss and the explained variance)."""
    encoded = [encode_chat(tokenizer, chat)[0] for chat in texts]
    shared = 0
    for column in zip(*encoded, strict=False):
        if len(set(column)) > 1:
            break
        shared += 1
    return max(1, min(shared, min(map(len, encoded)) - 1))  # every text keeps a token


def ensure_model_sae(model: str, layer: int, texts: str | Path | None = None,
                     force: bool = False, settings: ModelSAESettings = MODEL_DEFAULTS) -> Path:
    """The folder of `model`'s SAE at `layer` (sae-lens format, with quality.json), trained
    first unless cached (or `force`). `texts`: a file corpus.read_texts reads, else
    corpus.default_texts(). Every token of each text counts (template and prompt included, as
    sae-lens trains on whole contexts) but the opening all texts share (shared_opening);
    every `held_out_every`-th text only measures it."""
    from em_bench.models import load_base, model_identity

    given = read_texts(texts) if texts is not None else default_texts()
    source = str(texts) if texts is not None else "em-bench's default texts"
    out = model_sae_dir(model, layer, given, settings)
    if (out / "quality.json").is_file() and not force:
        return out
    used = at_most(given, settings.max_texts, settings.seed)
    train_texts, held_out_texts = split_held_out(used, settings.held_out_every)
    if not held_out_texts:
        raise DataError(f"{source}: {len(used)} texts; an SAE needs at least "
                        f"{settings.held_out_every} (every {settings.held_out_every}th is held "
                        f"out to measure it)")
    logger.info("training the SAE of %s at %s on %d texts of %s (cached afterwards at %s)",
                model, hook_name(layer), len(train_texts), source, out)
    base, tokenizer = load_base(model)
    skipped = shared_opening(tokenizer, used)

    def residuals(chats: list[Messages]):
        return collect_residuals(base, tokenizer, chats, layer, max_len=settings.max_len,
                                 skip_first=skipped)

    train_acts, held_out = residuals(train_texts), residuals(held_out_texts)
    identity = model_identity(model)
    d_sae = settings.latents_per_dim * base.config.hidden_size
    fit = dict(d_sae=d_sae, k=settings.k, steps=settings.steps, lr=settings.lr,
               seed=settings.seed, batch_size=settings.batch_size,
               dead_window=settings.dead_window, device=str(device_of(base)),
               metadata={"hook_name": hook_name(layer), "model_name": model,
                         "prepend_bos": _starts_with_bos(tokenizer, used[0]),
                         "context_size": settings.max_len, "em_bench_model": identity})
    train_and_save(out, train_acts, held_out, fit, {
        "layer": layer, "hook_name": hook_name(layer), "model": identity, "d_sae": d_sae,
        "settings": settings.model_dump(mode="json"), "texts": source,
        "texts_digest": texts_digest(given), "n_texts": len(train_texts),
        "n_held_out_texts": len(held_out_texts), "skipped_opening_tokens": skipped})
    return out


def train_command(model: str, layer: int, force: bool, texts: str | Path | None = None,
                  settings: ModelSAESettings | None = None) -> dict:
    """`em-bench sae train`: `model`'s SAE at `layer` (trained, or found in the cache) as
    {"path": its folder, **its quality.json}. An organism given no texts gets its own SAE
    (shipped, or trained on its world's chats); any other model, or texts, this module's
    (`settings`, default MODEL_DEFAULTS)."""
    from em_bench.models import is_organism

    if is_organism(model) and texts is None:
        return train_sae_command(model, layer, force)
    path = ensure_model_sae(model, layer, texts, force, settings or MODEL_DEFAULTS)
    return {"path": str(path), **json.loads((path / "quality.json").read_text(encoding="utf-8"))}
