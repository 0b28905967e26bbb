"""What the direction defenses share (caft, steering): their directions and their hooks.

The directions are BLOCK-EM's direction form: the same latent-set files (`latents`), or, when
none are given, the model's default sets exactly as blockem resolves them (the organism's,
discovered once from a probe fine-tune and cached: em_bench/sae/discover.py). So blockem, caft
and steering differ only in what they do with the directions: blockem penalises movement along
them, caft projects them out of the residual stream while training, steering adds the probe's
shift along them while training.

Only direction-form sets are taken: an SAE-form set is refused (a ConfigError at planning).
A set's directions are its latents' rows of `directions`, as blockem's readout reads them.

The hooks (`register`) are forward hooks on decoder blocks that edit the block's output hidden
state, the residual stream after it; the Defense protocol (defenses/base.py) has them on while
training, paused inside `evaluation()` and removed by `finish()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from em_bench.defenses.base import DefenseContext
from em_bench.defenses.blockem import blockem_inputs, blockem_method, latent_files
from em_bench.errors import ConfigError
from em_bench.layers import decoder_layers
from em_bench.sae.latents import LatentSet, load_latent_set

DIRECTIONS_VERSION = 1  # how the directions are resolved and turned into bases and hooks

LATENTS_HELP = ("direction-form latent-set files (one per hook point); none: the model's "
                "default sets, blockem's (the organism's are discovered once and cached)")

Check = Callable[[LatentSet, str], None]  # raises a ConfigError for a set a defense cannot use


@contextmanager
def as_defense(name: str) -> Iterator[None]:
    """Blockem's helpers name blockem in their errors; a direction defense's user reads its own
    name there."""
    try:
        yield
    except ConfigError as e:
        text = str(e)
        if text.startswith("defense blockem:"):
            raise ConfigError(f"defense {name}:{text.removeprefix('defense blockem:')}") from None
        raise


def load_sets(name: str, files: Sequence[str | Path], check: Check | None = None
              ) -> list[LatentSet]:
    """The direction-form latent sets in `files`; an SAE-form one is refused."""
    sets = []
    for f in files:
        s = load_latent_set(Path(f))
        if s.form != "directions":
            raise ConfigError(f"defense {name}: latents: {f} is a {s.form!r}-form set "
                              f"({s.label}); {name} takes direction-form sets only "
                              f"(discover them with the direction form, or leave latents out "
                              f"for the model's default sets)")
        if check is not None:
            check(s, str(f))
        sets.append(s)
    return sets


def resolve_sets(name: str, latents: list[str], ctx: DefenseContext,
                 check: Check | None = None) -> list[LatentSet]:
    """The sets a cell acts with: `latents`, or the model's default sets (discovered on first
    use), exactly as blockem resolves them."""
    with as_defense(name):
        files = latents or latent_files({}, ctx)
    return load_sets(name, files, check)


def direction_inputs(name: str, version: int, params: dict, ctx: DefenseContext,
                     check: Check | None = None) -> dict:
    """What a cell of a direction defense depends on beyond its parameters, for the cell hash:
    its sets' content (or the settings of the model's default sets: blockem's), and the
    versions of the shared part and of the defense (`name`_version)."""
    with as_defense(name):
        found = blockem_inputs(params, ctx)
    found.pop("blockem_version", None)  # blockem's penalty is not part of these defenses
    load_sets(name, params["latents"], check)  # an SAE-form or unusable set fails at planning
    return {**found, "directions_version": DIRECTIONS_VERSION, f"{name}_version": version}


def direction_method(name: str, params: dict, ctx: DefenseContext, strength: str) -> dict:
    """What a cell of a direction defense is, for a reader of its row (a defense's `describe`):
    its sets as blockem describes its own (form, layers, selection, K), and its strength."""
    with as_defense(name):
        method = blockem_method({**params, "lambda": None, "hinge": None}, ctx)
    for blockem_only in ("lambda", "hinge"):
        method.pop(blockem_only, None)
    return {**method, strength: params[strength]}


def unit_directions(latent_set: LatentSet) -> torch.Tensor:
    """The set's latents' directions, unit rows [K, d] (float32), as blockem's readout."""
    rows = torch.tensor(latent_set.directions, dtype=torch.float64)
    rows = rows[[x.index for x in latent_set.latents]]
    return (rows / rows.norm(dim=-1, keepdim=True)).float()


def by_layer(sets: Sequence[LatentSet]) -> dict[int, list[LatentSet]]:
    out: dict[int, list[LatentSet]] = {}
    for s in sets:
        out.setdefault(s.layer, []).append(s)
    return dict(sorted(out.items()))


def orthonormal_bases(sets: Sequence[LatentSet]) -> dict[int, torch.Tensor]:
    """Per layer, an orthonormal basis U [d, r] of the span of every direction at that layer.

    QR of the stacked directions when they are independent (the usual case: a set's directions
    are orthonormal already); when they are not (two sets sharing directions), the rank-revealing
    SVD's, so a direction given twice is one direction, not an extra arbitrary one."""
    bases = {}
    for layer, group in by_layer(sets).items():
        d = torch.cat([unit_directions(s) for s in group]).double().T  # [d, K]
        q, r = torch.linalg.qr(d)
        diag = r.diagonal().abs()
        if diag.min() > 1e-6 * diag.max():
            bases[layer] = q.float()
            continue
        u, s, _ = torch.linalg.svd(d, full_matrices=False)
        bases[layer] = u[:, s > 1e-6 * s.max()].float()
    return bases


def check_fits(name: str, sets: Sequence[LatentSet], model) -> None:
    """Each set's layer is a block of `model` and its directions have the model's width."""
    n = len(decoder_layers(model))
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    for s in sets:
        if s.layer >= n:
            raise ConfigError(f"defense {name}: latent set {s.label} is at layer {s.layer}, but "
                              f"the model has {n} decoder blocks")
        if width is not None and len(s.directions[0]) != width:
            raise ConfigError(f"defense {name}: latent set {s.label} has directions of width "
                              f"{len(s.directions[0])}, but the model's residual stream has "
                              f"{width} (discovered on {s.model})")


class ResidualHooks:
    """Forward hooks editing decoder blocks' output hidden states: `edits[layer](h) -> h'`.

    `pause()` (a context manager) turns them off while it lasts; `remove()` removes them for
    good. A block returning a tuple (older transformers) has its first element edited."""

    def __init__(self, model, edits: dict[int, Callable[[torch.Tensor], torch.Tensor]]):
        blocks = decoder_layers(model)
        self.paused = False
        self.handles = [blocks[layer].register_forward_hook(self._hook(edit))
                        for layer, edit in sorted(edits.items())]

    def _hook(self, edit: Callable[[torch.Tensor], torch.Tensor]):
        def hook(_module, _args, output):
            if self.paused:
                return None
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)
        return hook

    @contextmanager
    def pause(self) -> Iterator[None]:
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def register(model, edits: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> ResidualHooks:
    """Hooks on `decoder_layers(model)[layer]` replacing each block's output hidden state h by
    `edits[layer](h)`."""
    return ResidualHooks(model, edits)


class HookedDefense:
    """The protocol's part a direction defense shares: no loss term, its hooks (set in its
    `prepare`) paused inside `evaluation()` and removed by `finish()`."""

    hooks: ResidualHooks | None = None

    def terms(self, batch, outputs) -> dict:
        return {}

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        if self.hooks is None:
            yield
            return
        with self.hooks.pause():
            yield

    def finish(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
