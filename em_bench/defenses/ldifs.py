"""`ldifs`: LDIFS, the feature-space L2 regulariser (Mukhoti et al. 2023, "Fine-tuning can
cripple your foundation model; preserving features may be the solution", arXiv 2308.13320):

    weight * mean over the chosen decoder blocks l and the answer tokens t of
        || h_l,t(theta) - h_l,t(base) ||^2

h_l is decoder block l's output (the residual stream after it, where blockem and the SAEs read
it), the squared norm summed over the hidden dimensions; the answer tokens are the whole
answers' (`answer_labels`, as kl and blockem). h(base) is the base model's on the same inputs:
a LoRA model with its adapter disabled (as kl), a full fine-tune a frozen copy made in `prepare`.

Cost: h(base) is computed at every micro-batch, one extra forward pass without gradient (kl's
cost). It is not precomputed in `prepare` like blockem's anchors: blockem keeps K latents per
answer token, this would keep hidden-size numbers per answer token and chosen layer (a 7B's
4096 x 32 floats a token), which does not fit in memory for a real training set.

The term's scale is the activations' (it grows with the hidden size and the residual norm), so
`weight` is the parameter the selection rule sweeps.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
from pydantic import Field

from em_bench.data import IGNORE_INDEX
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.defenses.blockem import _BatchCapture
from em_bench.errors import ConfigError
from em_bench.layers import decoder_layers


class LDIFSParams(DefenseParams):
    weight: float = Field(1.0, gt=0, description="weight of the feature distance")
    layers: list[int] = Field(default_factory=list, description="decoder blocks whose outputs "
                              "are compared (0-based); none: every decoder block")


class _Capture(_BatchCapture):
    """blockem's capture of the training forward (the first forward on a batch's input_ids),
    which can be paused: this defense's own base pass and the curve's scoring are not kept."""

    paused = False

    def _start(self, module, args, kwargs):
        if self.paused:
            self._current = None
            return
        super()._start(module, args, kwargs)


class LDIFS:
    """LDIFS: keeps the fine-tuned model's block outputs near the base model's on the batch."""

    name = "ldifs"
    Params = LDIFSParams
    strength = "weight"  # the parameter the selection rule sweeps
    family = "loss term"  # what it acts on (the leaderboard's family column)
    needs = ()  # what it needs beyond the task's data

    def __init__(self, params: LDIFSParams, ctx: DefenseContext):
        self.weight, self.chosen = params.weight, params.layers

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        n = len(decoder_layers(model))
        bad = [layer for layer in self.chosen if not 0 <= layer < n]
        if bad:
            raise ConfigError(f"defense ldifs: layers {bad} are not decoder blocks of this model "
                              f"(it has {n}: 0 to {n - 1})")
        self.layers = sorted(set(self.chosen)) or list(range(n))
        # A LoRA model is its base with the adapter off; a full fine-tune needs a frozen copy,
        # made before the capture's hooks are (a copy would carry them).
        self.model = model
        self.reference = None if hasattr(model, "disable_adapter") else copy.deepcopy(model)
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
        self.capture = _Capture(model, self.layers)

    @torch.no_grad()
    def _base_features(self, batch) -> dict[int, torch.Tensor]:
        """The base model's block outputs on the batch (one forward, no gradient)."""
        base = self.reference or self.model
        blocks = decoder_layers(base)
        found: dict[int, torch.Tensor] = {}

        def keeper(layer: int):
            def keep(_module, _args, output):
                found[layer] = output[0] if isinstance(output, tuple) else output
            return keep

        handles = [blocks[layer].register_forward_hook(keeper(layer)) for layer in self.layers]
        self.capture.paused = True
        try:
            switch = self.model.disable_adapter() if self.reference is None else nullcontext()
            with switch:
                base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            self.capture.paused = False
            for handle in handles:
                handle.remove()
        return found

    def terms(self, batch, outputs) -> dict:
        hidden = self.capture.take(batch["input_ids"])  # the training forward's, with gradient
        answers = batch["answer_labels"] != IGNORE_INDEX
        if not answers.any():  # no answer token in this micro-batch (all cut by max_len)
            return {self.name: hidden[self.layers[0]].sum() * 0.0}
        base = self._base_features(batch)
        distances = torch.stack([(hidden[layer][answers].float() - base[layer][answers].float())
                                 .square().sum(-1) for layer in self.layers])  # [layers, tokens]
        return {self.name: self.weight * distances.mean()}

    @contextmanager
    def evaluation(self):
        """The curve's scoring between steps: its forwards are not kept."""
        self.capture.paused = True
        try:
            yield
        finally:
            self.capture.paused = False

    def finish(self) -> None:
        self.capture.close()
        self.model = self.reference = None
