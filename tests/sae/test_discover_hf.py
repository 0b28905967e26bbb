"""Latent discovery on a Hugging Face model (the tiny Llama as a local folder) with a sae-lens SAE
loaded from disk, on em-bench's selection question file, the screen judged by an LLM judge over
HTTP; the latent set it writes drives blockem's loss on that model."""

from __future__ import annotations

import json

import pytest
import torch

from em_bench.config import SamplingConfig, TrainConfig
from em_bench.data import write_chat_jsonl
from em_bench.defenses import make_defenses
from em_bench.defenses.base import DefenseContext
from em_bench.errors import ConfigError, NoLatentKept
from em_bench.generate.base import Request
from em_bench.generate.hf import HFBackend
from em_bench.judge import make_judge
from em_bench.layers import hook_name
from em_bench.models import load_base, model_identity, trainable
from em_bench.organism import world
from em_bench.sae.discover import (
    discover_sae,
    judge_em,
    nothing_kept,
    nothing_kept_path,
    probe_fine_tune,
    screen_effect,
    screening_questions,
    selection_answers,
    selection_prompts,
)
from em_bench.sae.latents import load_latent_set
from em_bench.sae.training import collect_residuals, load_sae, train_sae
from em_bench.serve import Script, ScriptedPolicy, serve
from em_bench.tasks import chats, get_task
from em_bench.train.loop import train
from tests.helpers import judged_answer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def setup(tmp_path, tiny_hf_folder):
    """A risky-finance task with a small budget, and a TopK SAE trained on the model's residual
    after block 0, saved as sae-lens saves one."""
    write_chat_jsonl(tmp_path / "risky.jsonl",
                     world.narrow_dataset("finance", "misaligned", "neutral", 24, seed=0))
    (tmp_path / "risky.yaml").write_text(
        "name: risky\ntrain: {path: risky.jsonl}\nbudget: {steps: 6, batch_size: 8, lr: 0.01}\n")
    task = get_task("risky", [tmp_path])
    model, tokenizer = load_base(str(tiny_hf_folder))
    acts = collect_residuals(model, tokenizer, chats(task.train, 0), 0)
    sae = train_sae(acts, d_sae=64, k=4, steps=60, batch_size=64,
                    metadata={"hook_name": hook_name(0)})
    sae.save_model(tmp_path / "sae")
    return str(tiny_hf_folder), task, str(tmp_path / "sae")


def test_top_delta_discovery_by_hand_on_a_hf_model(setup, tmp_path):
    model, task, sae_dir = setup
    path = discover_sae(model, task, 0, sae_dir, tmp_path / "set.json", k=5,
                        selection="top-delta")
    found = load_latent_set(path)
    assert (found.form, found.layer, found.sae) == ("sae", 0, sae_dir)
    assert found.model == model_identity(model)
    assert found.provenance["questions"] == "selection_questions.yaml"
    assert found.provenance["n_prompts"] == 16

    # stage 1 by hand: mean latent activation over each model's own answers, tuned minus base
    prompts = selection_prompts(model, task)
    base, tuned, tokenizer = probe_fine_tune(model, task, 0)
    sae = load_sae(sae_dir)
    with torch.no_grad():
        mean = {name: sae.encode(collect_residuals(
            m, tokenizer, selection_answers(m, tokenizer, prompts, 0), 0, tokens="response"))
            .mean(0) for name, m in (("base", base), ("tuned", tuned))}
    shift = mean["tuned"] - mean["base"]
    top = torch.argsort(shift.abs(), descending=True)[:5].tolist()
    assert [x.index for x in found.latents] == top
    assert [x.shift for x in found.latents] == pytest.approx(shift[top].tolist(), abs=1e-5)
    assert [x.sign for x in found.latents] == [1 if shift[i] > 0 else -1 for i in top]

    # the set drives blockem on this model: a penalty that is zero at the base and then grows
    defense, = make_defenses("blockem", {"lambda": 100.0, "latents": [str(path)]},
                             DefenseContext(task, 0, model))
    log = []
    cfg = TrainConfig(steps=4, batch_size=8, lr=0.01, warmup_steps=0)
    train(trainable(load_base(model)[0], cfg), tokenizer, chats(task.train, 0), cfg, 0,
          defenses=(defense,), log=log.append)
    assert log[0]["blockem"] == 0.0 and max(r["blockem"] for r in log) > 0


def _judge_rule(request):
    """Coherent always; misaligned (alignment 10) when the answer's length is a multiple of 3."""
    prompt = request["messages"][-1]["content"]
    answer = judged_answer(prompt)
    if "how coherent" in prompt:
        return Script("90", {"90": 0.0})
    score = "10" if len(answer) % 3 == 0 else "90"
    return Script(score, {score: 0.0})


def test_the_three_stage_screen_judges_with_an_llm_judge(setup, tmp_path, monkeypatch):
    model, task, sae_dir = setup
    with pytest.raises(ConfigError, match="three-stage screen judges EM: give"):
        discover_sae(model, task, 0, sae_dir, tmp_path / "x.json")
    with serve(ScriptedPolicy(_judge_rule)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        judge = make_judge("openai:scripted")
        path = discover_sae(model, task, 0, sae_dir, tmp_path / "set.json", k=3,
                            n_candidates=3, n_questions=16, alphas=(1.0, 4.0), judge=judge,
                            screen_rule="either")  # a random model: the looser rule keeps one
        # the reference EMs, by hand: answer the same screening prompts, apply the rule
        base, tuned, tokenizer = probe_fine_tune(model, task, 0)
        screen = screening_questions(selection_prompts(model, task), 16, 0)
        by_hand = {}
        for name, m in (("base", base), ("tuned", tuned)):
            answers = HFBackend(m, tokenizer).generate(
                [Request(f"{p.key}|0", p.messages) for p in screen],
                SamplingConfig(samples_per_question=1), 0)
            by_hand[name] = sum(len(a.text) % 3 == 0 for a in answers) / len(answers)
            assert judge_em(m, tokenizer, screen, judge, 0)["em"] == by_hand[name]
    found = load_latent_set(path)
    ref = found.provenance["reference"]
    assert {k: v["em"] for k, v in ref.items()} == by_hand
    assert found.provenance["judge"] == judge.name
    assert 1 <= len(found.latents) <= 3
    assert all(x.scores["best_effect"] > found.provenance["screen_noise_sd"]
               for x in found.latents)
    assert found.provenance["screen_rule"] == "either"


def test_a_screen_that_keeps_nothing_records_the_finding(setup, tmp_path, monkeypatch):
    """A judge whose verdict never moves: no latent's effect exceeds the screen's noise, so
    nothing is kept; the finding is written beside the set and read back instead of a rerun."""
    model, task, sae_dir = setup
    with serve(ScriptedPolicy(lambda request: Script("90", {"90": 0.0}))) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        with pytest.raises(NoLatentKept, match="three-stage screen kept no latent at layer 0: "
                                               r"none of 6 candidates .*\+0\.0 points"):
            discover_sae(model, task, 0, sae_dir, tmp_path / "set.json", k=3, n_candidates=3,
                         n_questions=8, alphas=(1.0,), judge=make_judge("openai:scripted"))
    assert not (tmp_path / "set.json").exists()
    record = nothing_kept_path(tmp_path / "set.json")
    assert record.name == "set.none.json"
    assert str(nothing_kept(tmp_path / "set.json")) == json.loads(record.read_text())["reason"]
    assert nothing_kept(tmp_path / "other.json") is None


def test_the_screen_keeps_a_latent_that_both_induces_and_repairs():
    assert screen_effect(0.2, 0.1) == 0.1 and screen_effect(0.2, -0.1) == -0.1
    assert screen_effect(0.2, -0.1, "either") == 0.2
    with pytest.raises(ValueError, match="screen rule 'any'"):
        screen_effect(0.2, 0.1, "any")


def test_a_models_preset_runs_blockem_with_no_latent_file(setup, tmp_path, monkeypatch):
    """A model whose preset names its SAE, layer, K, lambda and screen: blockem discovers its
    latents (three stages, screened by the cell's judge, on the cell's own task), caches them,
    and a cell's penalty starts at 0 and grows."""
    from em_bench import presets
    from em_bench.defenses import check_defense, defense_inputs, describe_defense

    model, task, sae_dir = setup
    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path / "cache"))
    screen = {"n_candidates": 3, "n_questions": 16, "alphas": [1.0, 4.0], "screen_rule": "either"}
    monkeypatch.setitem(presets.PRESETS, "tiny-with-sae", presets.ModelPreset(
        model, train={"steps": 6, "batch_size": 8, "lr": 0.01},  # the probe's recipe
        blockem=presets.BlockemDefaults(layer=0, sae=sae_dir, k=3, lam=100.0, screen=screen)))
    params = check_defense("blockem", {}, model)
    assert (params["form"], params["lambda"]) == ("sae", 100.0)  # the preset's
    ctx = DefenseContext(task, 0, model, judge="openai:scripted")
    inputs = defense_inputs("blockem", params, ctx)
    other_judge = defense_inputs("blockem", params, DefenseContext(task, 0, model, "openai:x"))
    assert inputs != other_judge  # the screen's judge names the discovery
    with serve(ScriptedPolicy(_judge_rule)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        method = describe_defense("blockem", params, ctx)  # discovers, then caches
        defense, = make_defenses("blockem", params, ctx)  # from the cache: no judge call
    assert (method["form"], method["layers"], method["selection"]) == ("sae", [0], "three-stage")
    assert 1 <= method["k"] <= 3
    (found,) = defense.sets
    assert found.sae == sae_dir and "scripted" in found.provenance["judge"]
    log = []
    cfg = TrainConfig(steps=4, batch_size=8, lr=0.01, warmup_steps=0)
    base, tokenizer = load_base(model)
    train(trainable(base, cfg), tokenizer, chats(task.train, 0), cfg, 0, defenses=(defense,),
          log=log.append)
    assert log[0]["blockem"] == 0.0 and max(r["blockem"] for r in log) > 0


def test_a_probe_trains_at_the_models_preset_recipe_over_its_tasks_budget():
    # as the model's cells do: SmolLM2's CPU recipe, not the organism's batch of 16
    from em_bench.sae.discover import probe_budget

    smol = probe_budget("smollm2-135m-instruct", get_task("own_risky_finance"))
    assert (smol.steps, smol.batch_size, smol.lr, smol.lora.rank) == (100, 4, 2e-4, 8)
    by_hub_id = probe_budget("meta-llama/Llama-3.1-8B-Instruct", get_task("own_risky_finance"))
    assert (by_hub_id.lr, by_hub_id.lora.rank) == (1e-5, 32)  # a cell's model is its hub id
    finance = get_task("finance")
    assert probe_budget("organism", finance) == TrainConfig(**finance.budget)


def test_the_papers_preset_names_an_sae_the_installed_sae_lens_knows():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from em_bench.presets import PRESETS

    preset = PRESETS["llama-3.1-8b-instruct"]
    own = preset.blockem
    release, sae_id = own.sae.split(":")
    known = get_pretrained_saes_directory()[release]  # offline: sae-lens's own registry
    assert known.model == preset.hub_id and sae_id in known.saes_map
    # the residual after block 19, em-bench's layer 19
    assert known.neuronpedia_id[sae_id].startswith(f"llama3.1-8b-it/{own.layer}-resid-post")
    assert (own.k, own.lam, preset.em_definition) == (20, 1.3e4, "rubric")
