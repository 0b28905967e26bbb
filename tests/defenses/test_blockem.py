"""Latent sets and the blockem defense on a tiny Llama: the readout, the base anchors, the
penalty by hand, and that other forwards in a step are never mistaken for the batch's."""

from __future__ import annotations

import json

import pytest
import torch

from em_bench.board.rows import method_label
from em_bench.config import LoraSettings, TrainConfig
from em_bench.data import IGNORE_INDEX, collate, encode_chat
from em_bench.defenses import check_defense, defense_inputs, describe_defense
from em_bench.defenses.base import DefenseContext
from em_bench.defenses.blockem import BlockEM, BlockEMParams
from em_bench.defenses.kl import KL, KLParams
from em_bench.errors import ConfigError
from em_bench.models import trainable
from em_bench.organism import world
from em_bench.sae.latents import Latent, LatentSet, load_latent_set, readout, save_latent_set
from em_bench.sae.training import ResidualCapture
from em_bench.tasks import TaskSpec
from em_bench.train.loop import train
from tests.helpers import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATS = world.narrow_dataset("finance", "misaligned", "neutral", n=16, seed=0)
LORA = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=0,
                   lora=LoraSettings(rank=4, alpha=8))
CTX = DefenseContext(TaskSpec(name="t"), seed=0, model="tiny")


def _directions(tmp_path, layer: int, rows: list[list[float]], signs=None, name="set.json"):
    signs = signs or [1] * len(rows)
    s = LatentSet(form="directions", selection="test", model="tiny", layer=layer,
                  hook_name=f"blocks.{layer}.hook_resid_post",
                  latents=[Latent(index=i, sign=g, shift=0.0) for i, g in enumerate(signs)],
                  directions=rows)
    return save_latent_set(s, tmp_path / name)


def test_a_direction_readout_is_the_projection_on_the_unit_direction(tmp_path):
    path = _directions(tmp_path, 0, [[3.0] + [0.0] * 31, [0.0, 0.0, 2.0] + [0.0] * 29], [1, -1])
    r = readout(load_latent_set(path))
    h = torch.zeros(2, 32)
    h[0, 0], h[0, 2], h[1, 0] = 5.0, -4.0, -1.0
    assert r(h).tolist() == [[5.0, -4.0], [-1.0, 0.0]]  # no relu on directions
    assert r.sign.tolist() == [1.0, -1.0]


class _TopTwoSAE(torch.nn.Module):
    """An SAE whose encode keeps the two largest of relu(h @ W + b) (TopK with k=2)."""

    W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([0.5, -1.0, 0.0])

    def encode(self, h):
        z = torch.relu(h @ self.W + self.b)
        top = z.topk(2, dim=-1)
        return torch.zeros_like(z).scatter(-1, top.indices, top.values)


def test_an_sae_readout_is_the_saes_own_latent_activation():
    s = LatentSet(form="sae", selection="test", model="tiny", layer=0, hook_name="h", sae="x",
                  latents=[Latent(index=2, sign=1, shift=0.1), Latent(index=0, sign=-1, shift=-1)])
    r = readout(s, _TopTwoSAE())
    h = torch.tensor([[3.0, 4.0], [0.0, 4.0]], requires_grad=True)
    # row 0: relu(h W + b) = (3.5, 3, 6): latents 2 and 0 kept; row 1: (0.5, 3, 0): 1 and 0
    assert r(h).tolist() == [[6.0, 3.5], [0.0, 0.5]]
    assert r.sign.tolist() == [1.0, -1.0]
    r(h).sum().backward()
    assert h.grad.tolist() == [[3.0, 0.0], [1.0, 0.0]]  # only the kept latents carry gradient
    with pytest.raises(ConfigError, match="load it first"):
        readout(s)


def test_a_bad_latent_set_file_names_the_file_and_the_problem(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"form": "directions", "selection": "x",
                                                   "model": "m", "layer": 0, "hook_name": "h",
                                                   "latents": [{"index": 3, "sign": 1,
                                                                "shift": 0.0}],
                                                   "directions": [[1.0]]}))
    with pytest.raises(ConfigError, match="bad.json: not a latent-set file: .*not a row"):
        load_latent_set(tmp_path / "bad.json")
    (tmp_path / "no.json").write_text("{")
    with pytest.raises(ConfigError, match="no.json: not valid JSON"):
        load_latent_set(tmp_path / "no.json")


def _blockem(tmp_path, tok, layers=(0, 1), lam=1.0, hinge="squared"):
    torch.manual_seed(1)
    paths = [_directions(tmp_path, layer, torch.randn(3, 32).tolist(), [1, -1, 1],
                         name=f"L{layer}.json") for layer in layers]
    params = BlockEMParams.model_validate({"lambda": lam, "latents": [str(p) for p in paths],
                                           "hinge": hinge})
    return BlockEM(params, CTX)


def test_anchors_are_the_base_readout_at_each_answer_token(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer)
    defense = _blockem(tmp_path, tiny_tokenizer)
    encoded = [encode_chat(tiny_tokenizer, c) for c in CHATS[:3]]
    defense.prepare(model, tiny_tokenizer, encoded, 256)
    for i, (ids, labels) in enumerate(encoded):
        answers = torch.tensor(labels) != IGNORE_INDEX
        with ResidualCapture(model, [0, 1]) as capture, torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for k, (s, r) in enumerate(zip(defense.sets, defense.readouts, strict=True)):
            expected = r(capture.outputs[s.layer][0][answers])
            assert torch.allclose(defense.anchors[i][k], expected, atol=1e-5)
    defense.finish()


@pytest.mark.parametrize("hinge", ["squared", "plain"])
def test_the_penalty_by_hand_counts_only_movement_in_the_blocked_direction(
        tmp_path, tiny_tokenizer, hinge):
    model = make_tiny_llama(tiny_tokenizer)
    defense = _blockem(tmp_path, tiny_tokenizer, layers=(1,), lam=0.5, hinge=hinge)
    encoded = [encode_chat(tiny_tokenizer, c) for c in CHATS[:2]]
    defense.prepare(model, tiny_tokenizer, encoded, 256)
    batch = collate(encoded, tiny_tokenizer.pad_token_id)
    batch.update(index=torch.tensor([0, 1]), answer_labels=batch["labels"])
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    assert defense.terms(batch, out)["blockem"].item() == pytest.approx(0, abs=1e-6)
    # move the anchors by hand: z(base) 1 lower on latent 0 (sign +1: z now exceeds it by 1)
    # and 1 lower on latent 1 (sign -1: z is above the anchor, which is allowed)
    for a in defense.anchors:
        a[0][:, 0] -= 1.0
        a[0][:, 1] -= 1.0
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    # each answer token adds hinge(1) = 1 on latent 0 only; the mean over tokens is 1
    assert defense.terms(batch, out)["blockem"].item() == pytest.approx(0.5, rel=1e-5)
    defense.finish()


def test_blockem_in_the_loop_starts_at_zero_and_reads_the_batchs_own_forward(
        tmp_path, tiny_tokenizer):
    model = trainable(make_tiny_llama(tiny_tokenizer), LORA)
    blocks = model.get_base_model().model.layers
    hooks_before = [len(b._forward_hooks) for b in blocks]
    defense = _blockem(tmp_path, tiny_tokenizer, lam=10.0)
    # kl runs a second (base) forward in every step, before blockem reads its capture
    records = []
    train(model, tiny_tokenizer, CHATS, LORA, seed=0,
          defenses=(KL(KLParams(), CTX), defense), log=records.append)
    assert records[0]["blockem"] == pytest.approx(0, abs=1e-6)
    assert records[-1]["blockem"] > 0
    assert set(records[0]) == {"step", "lr", "sft", "kl", "blockem"}
    assert [len(b._forward_hooks) for b in blocks] == hooks_before  # finish() removed them


def test_blockem_lowers_the_blocked_movement(tmp_path, tiny_tokenizer):
    def final_penalty(lam):
        model = trainable(make_tiny_llama(tiny_tokenizer), LORA)
        probe = _blockem(tmp_path, tiny_tokenizer, lam=1.0)
        probe.prepare(model, tiny_tokenizer, [encode_chat(tiny_tokenizer, c) for c in CHATS],
                      256)
        defense = _blockem(tmp_path, tiny_tokenizer, lam=lam)
        train(model, tiny_tokenizer, CHATS, LORA, seed=0, defenses=(defense,))
        batch = collate([encode_chat(tiny_tokenizer, c) for c in CHATS],
                        tiny_tokenizer.pad_token_id)
        batch.update(index=torch.arange(len(CHATS)), answer_labels=batch["labels"])
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return probe.terms(batch, out)["blockem"].item()

    assert final_penalty(100.0) < 0.5 * final_penalty(1e-4)


def test_blockem_params_and_inputs(tmp_path):
    assert check_defense("blockem", {"lambda": "0.5"}) == {
        "lambda": 0.5, "latents": [], "form": None, "selection": None, "layers": [],
        "k": None, "hinge": "squared"}
    with pytest.raises(ConfigError, match="hinge"):
        check_defense("blockem", {"hinge": "cubic"})
    path = _directions(tmp_path, 0, [[1.0, 0.0]])
    inputs = defense_inputs("blockem", {"lambda": 1.0, "latents": [str(path)]}, CTX)
    assert list(inputs["latents_sha256"]) == [str(path)]
    path.write_text(path.read_text().replace('"test"', '"changed"'))
    again = defense_inputs("blockem", {"lambda": 1.0, "latents": [str(path)]}, CTX)
    assert again != inputs  # a latent set is known by its content
    with pytest.raises(ConfigError, match="no latent-set file"):
        defense_inputs("blockem", {"lambda": 1.0, "latents": [str(tmp_path / "x.json")]}, CTX)
    with pytest.raises(ConfigError, match="lambda has no default for tiny"):
        check_defense("blockem", {"latents": [str(path)]}, "tiny")
    with pytest.raises(ConfigError, match="latents has no default for tiny"):
        defense_inputs("blockem", {"lambda": 1.0, "latents": []}, CTX)


def test_a_blockem_cell_says_its_form_layers_selection_k_and_lambda(tmp_path):
    files = [str(_directions(tmp_path, layer, [[1.0, 0.0], [0.0, 1.0]], name=f"L{layer}.json"))
             for layer in (0, 2)]
    method = describe_defense("blockem", {"lambda": 0.5, "latents": files, "hinge": "squared"},
                              CTX)
    assert method == {"form": "directions", "layers": [0, 2], "selection": "test", "k": 2,
                      "lambda": 0.5, "hinge": "squared"}
    row = {"method": method, "defense_params": {}}
    assert method_label(row) == "directions L0,2 K=2 test hinge=squared lambda=0.5"
    assert method_label({"method": {}, "defense_params": {"beta": 1.0}}) == "beta=1.0"
    assert describe_defense("kl", {"weight": 1.0}, CTX) == {}


@pytest.mark.usefixtures("organism")
def test_the_default_blockem_is_named_as_the_organisms_default_directions():
    ctx = DefenseContext(TaskSpec(name="t"), seed=0, model="organism")
    method = describe_defense("blockem", check_defense("blockem", {}, "organism"), ctx)
    assert method == {"form": "directions", "layers": [0, 1, 2, 3], "selection": "principal-shift",
                      "k": 5, "lambda": 0.002, "hinge": "squared"}


def test_blockem_takes_latent_files_or_a_discovery_not_both(tmp_path):
    path = str(_directions(tmp_path, 0, [[1.0, 0.0]]))
    for discovery in ({"form": "sae"}, {"selection": "random"}, {"k": "3"}, {"layers": ["1"]}):
        with pytest.raises(ConfigError, match="latents files, or a discovery"):
            check_defense("blockem", {"latents": [path], **discovery}, "organism")
    with pytest.raises(ConfigError, match="k"):
        check_defense("blockem", {"k": "0"}, "organism")


@pytest.mark.usefixtures("organism")
def test_a_named_discovery_is_its_own_cell_and_bad_names_fail_when_planned():
    ctx = DefenseContext(TaskSpec(name="t"), seed=0, model="organism")

    def inputs(**given):
        return defense_inputs("blockem", check_defense("blockem", given, "organism"), ctx)

    default, sae = inputs(), inputs(form="sae")
    assert default != sae != inputs(form="sae", selection="top-delta") != inputs(form="sae", k=5)
    assert inputs(selection="principal-shift") == default  # the default, named
    with pytest.raises(ConfigError, match="selection is one of three-stage, top-delta, random"):
        inputs(form="sae", selection="principal-shift")
    with pytest.raises(ConfigError, match=r"latent layers \[7\]: organism has blocks 0-3"):
        inputs(layers=[7])


@pytest.mark.usefixtures("organism")
def test_discovery_settings_fill_each_forms_defaults():
    from em_bench.sae.discovered import default_settings, discovery_settings, selection_of

    default = default_settings("organism")
    assert (default["form"], default["layers"], default["k"]) == ("directions", [0, 1, 2, 3], 5)
    assert "selection" not in default and selection_of(default) == "principal-shift"
    sae = discovery_settings("organism", "sae")
    assert (sae["layers"], sae["k"], selection_of(sae)) == ([2], 20, "three-stage")
    assert "sae" in sae  # the organism's SAE settings are part of what names the sets
    ablation = discovery_settings("organism", "directions", "random", [3, 1], 4)
    assert (ablation["layers"], ablation["k"], ablation["selection"]) == ([1, 3], 4, "random")


@pytest.mark.usefixtures("organism")
def test_a_named_discovery_is_found_once_and_labels_the_row(tmp_path, monkeypatch):
    import em_bench.sae.discovered as discovered

    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path / "cache"))
    found = []

    def fake_sae_sets(model, task, layers, folder, k, selection, seed):
        found.append((task.name, layers, k, selection, seed))
        folder.mkdir(parents=True, exist_ok=True)
        return [_directions(folder, layer, [[1.0, 0.0]] * 3, name=f"sae_{selection}_L{layer}.json")
                for layer in layers]

    monkeypatch.setattr(discovered, "discover_sae_sets", fake_sae_sets)
    ctx = DefenseContext(TaskSpec(name="t"), seed=0, model="organism")
    params = check_defense("blockem", {"form": "sae", "selection": "top-delta", "k": "3"},
                           "organism")
    method = describe_defense("blockem", params, ctx)
    assert found == [("finance", [2], 3, "top-delta", 0)]  # the probe task, discovery's seed
    assert (method["layers"], method["k"], method["selection"]) == ([2], 3, "test")
    describe_defense("blockem", params, ctx)
    assert len(found) == 1  # cached by its settings
