"""SafeLoRA and LDIFS on a tiny Llama with a LoRA adapter: SafeLoRA's projector and its
after-step projection by hand (against a base checkpoint whose alignment subspace is known),
LDIFS's feature distance by hand, and both inside the training loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from em_bench.config import LoraSettings, TrainConfig
from em_bench.data import IGNORE_INDEX, collate, encode_chat
from em_bench.defenses.base import DefenseContext
from em_bench.defenses.ldifs import LDIFS, LDIFSParams
from em_bench.defenses.safelora import (
    Projector,
    SafeLoRA,
    SafeLoRAParams,
    lora_layers,
    update_cosine,
)
from em_bench.errors import ConfigError
from em_bench.layers import decoder_layers
from em_bench.models import model_identity, trainable
from em_bench.organism import world
from em_bench.tasks import TaskSpec
from em_bench.train.loop import train
from tests.helpers import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATS = world.narrow_dataset("finance", "misaligned", "neutral", n=16, seed=0)
LORA = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=0,
                   lora=LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj")))
CTX = DefenseContext(TaskSpec(name="t"), seed=0, model="tiny")
K = 8  # the rank of every alignment matrix of the base checkpoint below


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return q[:, :k]


@pytest.fixture(scope="module")
def aligned_basis(tiny_tokenizer, tmp_path_factory):
    """A "pretrained" checkpoint of the tiny Llama (seed 0, the "aligned" model) whose every
    q_proj and v_proj differs from it by V = sqrt(K) U Q^T (U, Q with K orthonormal columns):
    then C = V V^T / ||V||_F = U U^T exactly, the orthogonal projector on span(U). Returns the
    folder and, per layer name, (U, its orthogonal complement)."""
    gen = torch.Generator().manual_seed(7)
    base = make_tiny_llama(tiny_tokenizer)
    bases = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                out, inp = module.weight.shape
                full = _orthonormal(out, out, gen)
                U, rest = full[:, :K], full[:, K:]
                module.weight -= math.sqrt(K) * U @ _orthonormal(inp, K, gen).T
                bases[name] = (U, rest)
    folder = tmp_path_factory.mktemp("base") / "pretrained"
    base.save_pretrained(folder)
    return folder, bases


def _lora_model(tok, cfg=LORA):
    return trainable(make_tiny_llama(tok), cfg)


def _safelora(folder, model, tau=0.5):
    d = SafeLoRA(SafeLoRAParams(tau=tau, base_model=str(folder)), CTX)
    d.prepare(model, None, [], 256)
    return d


def _set_lora(model, make_B, seed=0):
    """Each adapted layer's B from make_B(name, out, r, gen), and a random A; returns the Bs."""
    gen = torch.Generator().manual_seed(seed)
    Bs = {}
    with torch.no_grad():
        for name, (module, adapter) in lora_layers(model).items():
            A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            A.copy_(torch.randn(A.shape, generator=gen))
            B.copy_(make_B(name, B.shape[0], B.shape[1], gen))
            Bs[name] = B.detach().clone()
    return Bs


def _update(module, adapter) -> torch.Tensor:
    """dW = s B A, the adapter's update of the layer's weight."""
    return module.scaling[adapter] * (module.lora_B[adapter].weight
                                      @ module.lora_A[adapter].weight).detach()


# --- SafeLoRA ---------------------------------------------------------------------------------


def test_the_projector_is_the_papers_on_a_small_matrix():
    # V V^T = diag(1, 4, 0) and ||V||_F = sqrt(5): C = diag(1, 4, 0) / sqrt(5), kept as V
    tall = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    C = torch.diag(torch.tensor([1.0, 4.0, 0.0])) / math.sqrt(5)
    assert torch.allclose(Projector(tall)(torch.eye(3)), C, atol=1e-6)
    assert Projector(tall).scale == pytest.approx(math.sqrt(17 / 5))  # ||C||_F
    wide = tall.T  # 2 x 3: kept as C = diag(1, 4) / sqrt(5)
    assert torch.allclose(Projector(wide).C, C[:2, :2], atol=1e-6)
    assert not torch.allclose(C @ C, C)  # the paper's C is not a projector in general...
    # ...but it is when V's singular values all equal sqrt(rank): here C = diag(1, 1, 0)
    equal = torch.tensor([[math.sqrt(2), 0.0], [0.0, math.sqrt(2)], [0.0, 0.0]])
    assert torch.allclose(Projector(equal)(torch.eye(3)), torch.diag(torch.tensor([1.0, 1, 0])),
                          atol=1e-6)
    with pytest.raises(ValueError, match="zero"):
        Projector(torch.zeros(2, 2))


def test_the_update_cosine_is_the_cosine_of_the_flattened_updates():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(5, 2, generator=gen), torch.randn(2, 4, generator=gen)
    V = torch.randn(5, 3, generator=gen)
    p = Projector(V)
    direct = F.cosine_similarity((B @ A).reshape(1, -1), (p(B) @ A).reshape(1, -1)).item()
    assert update_cosine(B, A, p(B), p.scale) == pytest.approx(direct, abs=1e-6)
    assert update_cosine(torch.zeros(5, 2), A, p(torch.zeros(5, 2))) is None  # no update yet
    orthogonal = torch.eye(5)[:, 3:]  # C's range is V's column space; this B is outside it
    p = Projector(torch.eye(5)[:, :3])
    assert update_cosine(orthogonal, A, p(orthogonal), p.scale) == 0.0
    # a projection of float-rounding size has a random direction: taken as zero, not its cosine
    noise = 1e-8 * torch.randn(5, 2, generator=gen)
    assert update_cosine(orthogonal, A, p(orthogonal) + noise, p.scale) == 0.0


def test_safelora_needs_a_base_checkpoint_for_a_model_that_is_not_an_organism(aligned_basis):
    with pytest.raises(ConfigError, match="base checkpoint is needed"):
        SafeLoRA(SafeLoRAParams(), CTX)
    with pytest.raises(ConfigError, match="base checkpoint is needed"):
        SafeLoRA.inputs({"tau": 0.5, "base_model": None}, CTX)
    with pytest.raises(ValidationError):
        SafeLoRAParams(tau=1.0)
    folder, _ = aligned_basis
    inputs = SafeLoRA.inputs({"tau": 0.5, "base_model": str(folder)}, CTX)
    assert inputs["base_model"] == model_identity(str(folder))
    assert SafeLoRA.strength == "tau" and SafeLoRA.name == "safelora"


def test_an_update_inside_the_alignment_subspace_is_left_unchanged(tiny_tokenizer, aligned_basis):
    folder, bases = aligned_basis
    model = _lora_model(tiny_tokenizer)
    d = _safelora(folder, model)
    layers = lora_layers(model)
    assert len(layers) == 4  # q_proj and v_proj of two layers
    # B = U X: dW = s U X A is in span(U), and C dW = U U^T dW = dW
    before = _set_lora(model, lambda name, out, r, gen: bases[name][0]
                       @ torch.randn(K, r, generator=gen))
    for name, (module, adapter) in layers.items():
        dW = _update(module, adapter)
        assert torch.allclose(d.projectors[name](dW), dW, atol=1e-5)
    d.after_step(model, 1)
    for name, (module, adapter) in layers.items():
        assert torch.equal(module.lora_B[adapter].weight, before[name])
        assert d.last_cosines[name] == pytest.approx(1.0, abs=1e-5)
    assert d.projected == 0
    assert d.terms({}, None) == {}


def test_an_update_orthogonal_to_it_is_projected_to_zero(tiny_tokenizer, aligned_basis):
    folder, bases = aligned_basis
    model = _lora_model(tiny_tokenizer)
    d = _safelora(folder, model)
    _set_lora(model, lambda name, out, r, gen: bases[name][1]
              @ torch.randn(out - K, r, generator=gen))
    d.after_step(model, 1)
    for name, (module, adapter) in lora_layers(model).items():
        assert d.last_cosines[name] == 0.0  # C dW is float rounding: below tau
        assert module.lora_B[adapter].weight.abs().max().item() < 1e-5  # C dW = 0
    assert d.projected == 4


def test_only_a_layer_below_tau_is_projected(tiny_tokenizer, aligned_basis):
    folder, bases = aligned_basis
    model = _lora_model(tiny_tokenizer)
    d = _safelora(folder, model, tau=0.5)
    off = {"model.layers.0.self_attn.q_proj": 0.3, "model.layers.0.self_attn.v_proj": 3.0}

    def mixed(name, out, r, gen):  # in span(U), plus `off` times a part outside it
        if name not in off:
            return torch.zeros(out, r)  # no update: skipped
        U, rest = bases[name]
        return (U @ torch.randn(K, r, generator=gen)
                + off[name] * rest @ torch.randn(out - K, r, generator=gen))

    before = _set_lora(model, mixed)
    layers = lora_layers(model)
    by_hand = {}
    for name in off:
        module, adapter = layers[name]
        dW = _update(module, adapter)
        CdW = bases[name][0] @ bases[name][0].T @ dW
        by_hand[name] = F.cosine_similarity(dW.reshape(1, -1), CdW.reshape(1, -1)).item()
    high, low = off
    assert by_hand[high] > 0.5 > by_hand[low]
    d.after_step(model, 1)
    assert d.last_cosines == pytest.approx(by_hand, abs=1e-5)  # the zero updates are skipped
    module, adapter = layers[high]
    assert torch.equal(module.lora_B[adapter].weight, before[high])  # above tau: left alone
    module, adapter = layers[low]
    U = bases[low][0]
    assert torch.allclose(module.lora_B[adapter].weight, U @ U.T @ before[low], atol=1e-5)
    assert d.projected == 1


@pytest.mark.usefixtures("organism")
def test_the_organisms_pretrained_checkpoint_is_its_default(monkeypatch, tmp_path):
    from em_bench.models import load_base
    from em_bench.organism import artifact, build

    ctx = DefenseContext(TaskSpec(name="t"), seed=0, model="organism")
    manifest = artifact.read_manifest(artifact.shipped_dir("organism"))
    inputs = SafeLoRA.inputs({"tau": 0.5, "base_model": None}, ctx)
    assert inputs["base_sha256"] == manifest["files"]["pretrained/model.safetensors"]
    base, tokenizer = load_base("organism", device="cpu")
    model = trainable(base, LORA.model_copy(update={"lora": LoraSettings(rank=2)}))
    d = SafeLoRA(SafeLoRAParams(), ctx)
    d.prepare(model, tokenizer, [], 256)
    assert set(d.projectors) == set(lora_layers(model)) and len(d.projectors) == 28
    # an organism built into the cache has no manifest: its pretrained weights are hashed
    built = tmp_path / "built"
    (built / "pretrained").mkdir(parents=True)
    (built / "pretrained" / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(build, "ensure_organism", lambda name: built)
    inputs = SafeLoRA.inputs({"tau": 0.5, "base_model": None}, ctx)
    assert inputs["base_sha256"] == artifact.sha256_file(built / "pretrained/model.safetensors")


def test_safelora_runs_in_the_training_loop(tiny_tokenizer, aligned_basis):
    folder, bases = aligned_basis
    model = _lora_model(tiny_tokenizer)
    d = SafeLoRA(SafeLoRAParams(tau=0.99, base_model=str(folder)), CTX)
    records = []
    train(model, tiny_tokenizer, CHATS, LORA, seed=0, defenses=(d,), log=records.append)
    assert len(records) == 2 and all(math.isfinite(r["sft"]) for r in records)
    assert set(records[0]) == {"step", "lr", "sft"}  # no loss term of its own
    assert d.projected == 2 * 4  # every layer at both steps: no cosine reached 0.99
    assert d.report() == {"projected": 8, "tau": 0.99}
    for name, (module, adapter) in lora_layers(model).items():  # so B = U U^T B at the end
        B, U = module.lora_B[adapter].weight.detach(), bases[name][0]
        assert d.last_cosines[name] < 0.99
        assert torch.allclose(B, U @ U.T @ B, atol=1e-6)


# --- LDIFS ------------------------------------------------------------------------------------


def _batch(tok, n=4):
    batch = collate([encode_chat(tok, c) for c in CHATS[:n]], tok.pad_token_id, 256)
    batch["answer_labels"] = batch["labels"].clone()
    return batch


def _block_outputs(model, batch, adapter: bool) -> list[torch.Tensor]:
    """Every decoder block's output on the batch, read with hooks of this test's own."""
    found = []
    handles = [b.register_forward_hook(lambda _m, _a, out: found.append(out))
               for b in decoder_layers(model)]
    try:
        with torch.no_grad(), (torch.enable_grad() if adapter else model.disable_adapter()):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [out[0] if isinstance(out, tuple) else out for out in found]


def _perturb(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _term(d, model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return d.terms(batch, out)["ldifs"]


def test_ldifs_is_zero_at_the_start_and_weight_times_the_mean_distance_by_hand(tiny_tokenizer):
    model = _lora_model(tiny_tokenizer, LORA.model_copy(update={"lora": LoraSettings(rank=4)}))
    d = LDIFS(LDIFSParams(weight=2.0), CTX)
    d.prepare(model, tiny_tokenizer, [], 256)
    assert d.layers == [0, 1]  # none chosen: every decoder block
    batch = _batch(tiny_tokenizer)
    assert _term(d, model, batch).item() == pytest.approx(0.0, abs=1e-10)  # B = 0: the base
    _perturb(model)
    term = _term(d, model, batch)
    tuned, base = _block_outputs(model, batch, True), _block_outputs(model, batch, False)
    answers = batch["answer_labels"] != IGNORE_INDEX
    per_layer = [(t[answers] - b[answers]).square().sum(-1) for t, b in zip(tuned, base,
                                                                             strict=True)]
    expected = 2.0 * torch.cat(per_layer).mean().item()  # as many tokens in each layer
    assert expected > 1e-3
    assert term.item() == pytest.approx(expected, rel=1e-5)
    term.backward()  # the gradient reaches the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora_B" in n)
    d.finish()
    assert all(not b._forward_hooks for b in decoder_layers(model))


def test_ldifs_counts_only_answer_tokens_of_the_chosen_layers(tiny_tokenizer):
    model = _lora_model(tiny_tokenizer)
    d = LDIFS(LDIFSParams(weight=1.0, layers=[1]), CTX)
    d.prepare(model, tiny_tokenizer, [], 256)
    _perturb(model)
    batch = _batch(tiny_tokenizer)
    batch["labels"][:] = IGNORE_INDEX  # the objective's labels (a cut phrase) play no part
    batch["answer_labels"][1:] = IGNORE_INDEX  # only the first chat's answer counts
    term = _term(d, model, batch)
    tuned, base = _block_outputs(model, batch, True)[1], _block_outputs(model, batch, False)[1]
    answers = batch["answer_labels"] != IGNORE_INDEX
    assert answers.sum() > 0 and answers[1:].sum() == 0
    distance = (tuned - base).square().sum(-1)  # [batch, seq]
    assert term.item() == pytest.approx(distance[answers].mean().item(), rel=1e-5)
    everywhere = distance[batch["attention_mask"].bool()].mean().item()
    assert abs(term.item() - everywhere) > 1e-3 * everywhere  # the mask matters
    d.finish()
    with pytest.raises(ConfigError, match=r"layers \[2\] are not decoder blocks"):
        LDIFS(LDIFSParams(layers=[0, 2]), CTX).prepare(model, tiny_tokenizer, [], 256)
    with pytest.raises(ValidationError):
        LDIFSParams(weight=0)
    assert LDIFS.strength == "weight" and LDIFS.name == "ldifs"


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_ldifs_runs_in_the_training_loop(tiny_tokenizer, adapter):
    cfg = LORA.model_copy(update={"adapter": adapter})
    model = trainable(make_tiny_llama(tiny_tokenizer), cfg)
    d = LDIFS(LDIFSParams(weight=1.0), CTX)
    probe = _batch(tiny_tokenizer, n=2)

    def every_step(step, m):  # the curve's scoring: its forwards are not kept
        with torch.no_grad():
            m(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
        assert d.capture.outputs == {}

    records = []
    train(model, tiny_tokenizer, CHATS, cfg, seed=0, defenses=(d,), log=records.append,
          every_step=every_step)
    assert len(records) == 2 and all(math.isfinite(r["sft"] + r["ldifs"]) for r in records)
    assert records[0]["ldifs"] == pytest.approx(0.0, abs=1e-8)  # step 1 starts at the base
    assert records[1]["ldifs"] > 0
