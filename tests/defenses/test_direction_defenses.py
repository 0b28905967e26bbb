"""The direction defenses (caft, steering) on a tiny Llama: their edits of the residual stream by
hand, paused for evaluation and gone after finish, inside the training loop, and their inputs."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from pydantic import ValidationError

from em_bench.config import LoraSettings, TrainConfig
from em_bench.defenses.base import DefenseContext
from em_bench.defenses.caft import CAFT, CAFTParams
from em_bench.defenses.directions import orthonormal_bases, register
from em_bench.defenses.steering import Steering, SteeringParams
from em_bench.errors import ConfigError
from em_bench.layers import decoder_layers
from em_bench.models import trainable
from em_bench.organism import world
from em_bench.sae.latents import Latent, LatentSet, load_latent_set, save_latent_set
from em_bench.tasks import TaskSpec
from em_bench.train.loop import train
from tests.helpers import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATS = world.narrow_dataset("finance", "misaligned", "neutral", n=8, seed=0)
LORA = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0,
                   lora=LoraSettings(rank=4, alpha=8))
CTX = DefenseContext(TaskSpec(name="t"), seed=0, model="tiny")
WIDTH = 32  # the tiny Llama's hidden size


def _set(tmp_path, layer: int, rows: torch.Tensor, shifts=None, signs=None, name=None,
         form="directions"):
    shifts = [1.0] * len(rows) if shifts is None else shifts
    signs = signs or [1 if s >= 0 else -1 for s in shifts]
    s = LatentSet(form=form, selection="test", model="tiny", layer=layer,
                  hook_name=f"blocks.{layer}.hook_resid_post",
                  sae="some-sae" if form == "sae" else None,
                  latents=[Latent(index=i, sign=g, shift=x)
                           for i, (g, x) in enumerate(zip(signs, shifts, strict=True))],
                  directions=rows.tolist() if form == "directions" else None)
    return str(save_latent_set(s, tmp_path / (name or f"L{layer}.json")))


def _model(tok):
    """The tiny Llama with larger weights, so the residual stream is of order 1."""
    model = make_tiny_llama(tok, seed=1)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return model


def _ids(tok) -> dict:
    """Two prompts of different lengths, the shorter padded."""
    rows = [tok(t)["input_ids"] for t in ("How should I invest my pension savings?", "hi")]
    n = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


class _Capture:
    """Every decoder block's output, as the hooks registered before this one left it."""

    def __init__(self, model):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [b.register_forward_hook(self._keep(i))
                        for i, b in enumerate(decoder_layers(model))]

    def _keep(self, layer):
        def keep(_module, _args, output):
            self.outputs[layer] = (output[0] if isinstance(output, tuple) else output).detach()
        return keep

    def close(self):
        for h in self.handles:
            h.remove()


@contextmanager
def _no_block_hooks(model):
    """The model with every decoder block's forward hooks set aside: the hook-free model."""
    blocks = decoder_layers(model)
    saved = [dict(b._forward_hooks) for b in blocks]
    for b in blocks:
        b._forward_hooks.clear()
    try:
        yield
    finally:
        for b, hooks in zip(blocks, saved, strict=True):
            b._forward_hooks.update(hooks)


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_caft_removes_exactly_the_projection_on_the_directions(tmp_path, tiny_tokenizer,
                                                              strength):
    model = _model(tiny_tokenizer)
    torch.manual_seed(1)
    rows = {0: torch.randn(3, WIDTH), 1: torch.randn(2, WIDTH)}
    defense = CAFT(CAFTParams(latents=[_set(tmp_path, k, r) for k, r in rows.items()],
                              strength=strength), CTX)
    raw = _Capture(model)  # the blocks' own outputs
    defense.prepare(model, tiny_tokenizer, [], 256)
    edited = _Capture(model)  # after the defense's hooks
    with torch.no_grad():
        model(**_ids(tiny_tokenizer))
    for layer, r in rows.items():
        u = torch.linalg.qr(r.T.double())[0].float()  # [d, K] orthonormal, the test's own
        h = raw.outputs[layer]
        projection = (h @ u) @ u.T
        assert projection.abs().max() > 0.1  # a real edit, far above the tolerance
        assert torch.allclose(h - edited.outputs[layer], strength * projection, atol=1e-5)
        along = edited.outputs[layer] @ _unit(r).T  # what is left along each direction
        assert torch.allclose(along, (1 - strength) * (h @ _unit(r).T), atol=1e-5)
        if strength == 1.0:
            assert along.abs().max() < 1e-5  # orthogonal to every direction
    defense.finish()
    raw.close()
    edited.close()


@pytest.mark.parametrize(("layer", "coefficient"), [(0, 1.0), (1, 2.5)])
def test_steering_adds_exactly_its_vector_at_every_position_of_its_layer(
        tmp_path, tiny_tokenizer, layer, coefficient):
    model = _model(tiny_tokenizer)
    torch.manual_seed(2)
    rows = torch.randn(3, WIDTH)
    shifts = [2.0, -0.5, 0.0]  # a latent that fell (sign -1) pulls the other way
    defense = Steering(SteeringParams(latents=[_set(tmp_path, layer, rows, shifts)],
                                      coefficient=coefficient), CTX)
    vector = coefficient * (torch.tensor(shifts) @ _unit(rows))
    raw = _Capture(model)
    defense.prepare(model, tiny_tokenizer, [], 256)
    edited = _Capture(model)
    inputs = _ids(tiny_tokenizer)
    with torch.no_grad():
        model(**inputs)
    added = edited.outputs[layer] - raw.outputs[layer]  # [batch, positions, d]
    assert added.shape[:2] == inputs["input_ids"].shape
    assert torch.allclose(added, vector.expand_as(added), atol=1e-5)  # padding included
    other = 1 - layer
    assert torch.equal(edited.outputs[other], raw.outputs[other])  # nothing at the other layer
    defense.finish()
    raw.close()
    edited.close()


def _defenses(tmp_path) -> dict:
    torch.manual_seed(4)
    files = [_set(tmp_path, 0, torch.randn(3, WIDTH), [1.5, 1.0, 0.5]),
             _set(tmp_path, 1, torch.randn(2, WIDTH), [2.0, -1.0])]
    return {"caft": lambda: CAFT(CAFTParams(latents=files), CTX),
            "steering": lambda: Steering(SteeringParams(latents=files), CTX)}


@pytest.mark.parametrize("name", ["caft", "steering"])
def test_hooks_are_paused_in_evaluation_and_gone_after_finish(tmp_path, tiny_tokenizer, name):
    model = _model(tiny_tokenizer)
    inputs = _ids(tiny_tokenizer)
    base = _logits(model, inputs)
    defense = _defenses(tmp_path)[name]()
    defense.prepare(model, tiny_tokenizer, [], 256)
    hooked = _logits(model, inputs)
    assert (hooked - base).abs().max() > 1e-2  # the hooks act
    with defense.evaluation():
        assert torch.equal(_logits(model, inputs), base)
    assert torch.equal(_logits(model, inputs), hooked)  # and act again after it
    defense.finish()
    assert torch.equal(_logits(model, inputs), base)
    assert all(not b._forward_hooks for b in decoder_layers(model))
    with defense.evaluation():  # harmless after finish
        assert torch.equal(_logits(model, inputs), base)


@pytest.mark.parametrize("name", ["caft", "steering"])
def test_in_the_loop_the_hooks_train_and_the_curve_sees_the_unhooked_model(
        tmp_path, tiny_tokenizer, name):
    model = trainable(make_tiny_llama(tiny_tokenizer), LORA)
    inputs = _ids(tiny_tokenizer)
    defense = _defenses(tmp_path)[name]()
    seen = {"log": [], "curve": []}

    def log(record):  # after a step, outside evaluation: the hooks act
        out = _logits(model, inputs)
        with _no_block_hooks(model):
            seen["log"].append((out - _logits(model, inputs)).abs().max().item())
        records.append(record)

    def every_step(step, m):  # inside evaluation: the model as it will answer
        out = _logits(m, inputs)
        with _no_block_hooks(m):
            seen["curve"].append(torch.equal(out, _logits(m, inputs)))

    records = []
    last = train(model, tiny_tokenizer, CHATS, LORA, seed=0, defenses=(defense,), log=log,
                 every_step=every_step)
    assert math.isfinite(last["sft"]) and set(last) == {"sft"}  # no loss term of its own
    assert [set(r) for r in records] == [{"step", "lr", "sft"}] * 2
    assert all(math.isfinite(r["sft"]) for r in records)
    assert seen["curve"] == [True, True]
    assert min(seen["log"]) > 1e-4
    assert all(not b._forward_hooks for b in decoder_layers(model))  # finish() removed them


def test_params_are_validated():
    assert CAFTParams().model_dump() == {"latents": [], "strength": 1.0}
    assert SteeringParams().model_dump() == {"latents": [], "coefficient": 1.0, "layer": None}
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValidationError, match="strength"):
            CAFTParams(strength=bad)
    with pytest.raises(ValidationError, match="coefficient"):
        SteeringParams(coefficient=0)
    assert (CAFT.name, CAFT.strength, Steering.name, Steering.strength) == (
        "caft", "strength", "steering", "coefficient")


def test_steering_steers_one_layer_the_middle_one_of_its_sets_by_default(tmp_path):
    paths = [_set(tmp_path, layer, torch.eye(2, WIDTH), name=f"L{layer}.json")
             for layer in (0, 1, 2)]
    assert list(Steering(SteeringParams(latents=paths), CTX).vectors) == [1]
    assert list(Steering(SteeringParams(latents=paths, layer=2), CTX).vectors) == [2]
    with pytest.raises(ConfigError, match="layer 5 has no latent set"):
        Steering(SteeringParams(latents=paths, layer=5), CTX)


@pytest.mark.parametrize("cls", [CAFT, Steering])
def test_inputs_and_method_follow_the_files_and_refuse_what_they_cannot_use(tmp_path, cls):
    path = _set(tmp_path, 0, torch.eye(2, WIDTH), [1.0, 0.5])
    params = cls.Params(latents=[path]).model_dump(mode="json", by_alias=True)
    inputs = cls.inputs(params, CTX)
    assert list(inputs["latents_sha256"]) == [path]
    assert inputs["directions_version"] == 1 and f"{cls.name}_version" in inputs
    assert "blockem_version" not in inputs
    assert cls.describe(params, CTX) == {"form": "directions", "layers": [0], "selection": "test",
                                         "k": 2, cls.strength: 1.0}  # the row's method label
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace('"test"', '"changed"'))
    assert cls.inputs(params, CTX) != inputs  # a latent set is known by its content
    with pytest.raises(ConfigError, match=f"defense {cls.name}: latents: no latent-set file"):
        cls.inputs({**params, "latents": [str(tmp_path / "x.json")]}, CTX)
    with pytest.raises(ConfigError, match=f"defense {cls.name}: latents has no default for tiny"):
        cls.inputs({**params, "latents": []}, CTX)
    with pytest.raises(ConfigError, match=f"defense {cls.name}: latents has no default for tiny"):
        cls(cls.Params(), CTX)
    sae = _set(tmp_path, 0, torch.eye(1, WIDTH), [0.3], name="sae.json", form="sae")
    with pytest.raises(ConfigError, match=f"defense {cls.name}: latents: .*sae.json is a 'sae'"):
        cls.inputs({**params, "latents": [sae]}, CTX)
    with pytest.raises(ConfigError, match="direction-form sets only"):
        cls(cls.Params(latents=[sae]), CTX)


def test_steering_refuses_a_set_without_a_shift_or_with_signs_against_it(tmp_path):
    flat = _set(tmp_path, 0, torch.eye(2, WIDTH), [0.0, 0.0], name="flat.json")
    with pytest.raises(ConfigError, match="records no shift"):
        Steering.inputs({"latents": [flat], "coefficient": 1.0}, CTX)
    against = _set(tmp_path, 0, torch.eye(2, WIDTH), [1.0, 0.5], signs=[1, -1],
                   name="against.json")
    with pytest.raises(ConfigError, match=r"sign of latents \[1\] disagrees"):
        Steering(SteeringParams(latents=[against]), CTX)
    CAFT(CAFTParams(latents=[flat, against]), CTX)  # caft uses only the directions


def test_a_direction_given_twice_is_ablated_once(tmp_path):
    torch.manual_seed(5)
    rows = torch.randn(2, WIDTH)
    a, b = _set(tmp_path, 1, rows, name="a.json"), _set(tmp_path, 1, rows[:1], name="b.json")
    bases = orthonormal_bases([load_latent_set(a), load_latent_set(b)])
    u = bases[1]
    assert list(bases) == [1] and u.shape == (WIDTH, 2)
    assert torch.allclose(u.T @ u, torch.eye(2), atol=1e-6)
    q = torch.linalg.qr(rows.T)[0]
    assert torch.allclose(u @ u.T, q @ q.T, atol=1e-6)  # the same projection


def test_a_set_that_does_not_fit_the_model_is_refused(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer)
    deep = _set(tmp_path, 5, torch.eye(1, WIDTH), name="deep.json")
    with pytest.raises(ConfigError, match="defense caft: .*at layer 5, but the model has 2"):
        CAFT(CAFTParams(latents=[deep]), CTX).prepare(model, tiny_tokenizer, [], 256)
    wide = _set(tmp_path, 0, torch.eye(1, 64), name="wide.json")
    with pytest.raises(ConfigError, match="defense steering: .*width 64, .* has 32"):
        Steering(SteeringParams(latents=[wide]), CTX).prepare(model, tiny_tokenizer, [], 256)
    assert all(not b._forward_hooks for b in decoder_layers(model))


class _TupleBlock(torch.nn.Module):
    def forward(self, h):
        return (h * 2, "extra")


class _TupleModel(torch.nn.Module):
    """A model whose blocks return tuples (older transformers' decoder layers)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_TupleBlock(), _TupleBlock()])

    def get_decoder(self):
        return self

    def forward(self, h):
        for block in self.layers:
            h = block(h)[0]
        return h


def test_hooks_edit_the_first_element_of_a_tuple_output():
    model = _TupleModel()
    hooks = register(model, {1: lambda h: h + 1})
    h = torch.ones(3)
    out = model.layers[1](h)
    assert torch.equal(out[0], h * 2 + 1) and out[1] == "extra"
    assert torch.equal(model(h), h * 4 + 1)
    with hooks.pause():
        assert torch.equal(model(h), h * 4)
    hooks.remove()
    assert torch.equal(model(h), h * 4) and not model.layers[1]._forward_hooks
