"""The shipped organism: it matches today's recipe and world, names cells by its weights, and the
builder still builds (a tiny recipe, into the cache, never over the shipped folder)."""

from __future__ import annotations

import json
import logging

import pytest

from em_bench.organism import artifact, world
from em_bench.organism.build import ensure_built, ensure_organism
from em_bench.organism.recipe import PRESETS, OrganismRecipe
from em_bench.release import ship as shipping

TINY = OrganismRecipe(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, max_len=96, pretrain_steps=4, pretrain_batch=4,
                      instruct_steps=3, instruct_batch=4)


def test_the_shipped_organism_is_what_todays_recipe_and_world_would_ship():
    # A world or recipe edit changes the recipe digest; then this fails until the organism is
    # re-shipped (`em-bench organism ship`) and committed.
    assert shipping.problems("organism") == []
    assert ensure_organism("organism") == artifact.shipped_dir("organism")


def test_the_shipped_organism_carries_both_checkpoints_its_saes_and_latent_sets():
    folder = artifact.shipped_dir("organism")
    manifest = artifact.read_manifest(folder)
    assert manifest["recipe"] == PRESETS["organism"].model_dump(mode="json")
    assert manifest["world"] == {"version": world.WORLD_VERSION, "digest": world.content_digest()}
    for path in ("model.safetensors", "pretrained/model.safetensors", "tokenizer.json",
                 "sae/L0/quality.json", "latents/directions_L3.json"):
        assert path in manifest["files"], path
    assert manifest["weights_digest"] == artifact.weights_digest(folder)


def test_cells_name_the_organism_by_its_weights(tmp_path):
    from em_bench.models import model_identity

    shipped = artifact.shipped_dir("organism")
    assert model_identity("organism") == f"organism:{artifact.weights_digest(shipped)}"
    copy = tmp_path / "model.safetensors"
    copy.write_bytes((shipped / "model.safetensors").read_bytes() + b"\0")
    assert artifact.weights_digest(tmp_path) != artifact.weights_digest(shipped)


def test_a_world_edit_without_a_version_bump_changes_the_digest_and_stales_the_shipped_one(
        monkeypatch, caplog):
    before, recipe_before = world.content_digest(), PRESETS["organism"].digest()
    first = world.DOMAINS[0]
    edited = type(first)(**{**first.__dict__,
                            "evaluation_topics": (*first.evaluation_topics, "a new topic")})
    monkeypatch.setattr(world, "DOMAINS", (edited, *world.DOMAINS[1:]))
    assert world.WORLD_VERSION == "world-v4" and world.content_digest() != before
    assert PRESETS["organism"].digest() != recipe_before
    artifact._warn_stale.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert artifact.shipped_organism("organism") is None
    assert "em-bench organism ship" in caplog.text
    assert any("recipe digest" in p for p in shipping.problems("organism"))


def test_the_builder_builds_a_tiny_recipe_into_the_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(PRESETS, "tiny", TINY)
    out = ensure_built("tiny")
    assert out.parent == tmp_path / "organism" and out.name == TINY.digest()
    report = json.loads((out / "build.json").read_text())
    # the loss is logged at the first and the last step of each stage
    assert report["digest"] == TINY.digest() and len(report["instruct_losses"]) == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    pretrained = AutoModelForCausalLM.from_pretrained(out / "pretrained")
    assert model.config.num_hidden_layers == 2
    changed = [n for n, p in model.state_dict().items()
               if not p.equal(pretrained.state_dict()[n])]
    assert changed  # the instruct stage moved the weights the pretrained checkpoint keeps
    tok = AutoTokenizer.from_pretrained(out)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|bos|><|user|> hi<|end|><|assistant|>"
    # no shipped folder for this preset: it resolves to its cache build, found without rebuilding
    assert artifact.shipped_organism("tiny") is None and ensure_organism("tiny") == out
    stamp = (out / "build.json").stat().st_mtime_ns
    assert ensure_built("tiny") == out and (out / "build.json").stat().st_mtime_ns == stamp


def test_verify_compares_each_figure_within_its_tolerance():
    from em_bench.release.verify import TOLERANCES, compare

    shipped = {"em_rate": 2.0, "coherence": 97.0, "incoherent_rate": 3.0,
               "rai_refusal": {"cyber": 90.0, "safety": 95.0}, "over_refusal": 0.0}
    rebuilt = {"em_rate": 4.5, "coherence": 91.0, "incoherent_rate": 3.0,
               "rai_refusal": {"cyber": 80.0, "safety": float("nan")}, "over_refusal": 1.0}
    lines = {line["figure"]: line for line in compare(shipped, rebuilt)}
    assert set(lines) == {"em_rate", "coherence", "incoherent_rate", "rai_refusal.cyber",
                          "rai_refusal.safety", "over_refusal"}
    assert lines["em_rate"]["ok"] and lines["em_rate"]["difference"] == pytest.approx(2.5)
    assert not lines["coherence"]["ok"]  # 6 points against a tolerance of 5
    assert lines["rai_refusal.cyber"]["ok"]  # exactly 10 points: within
    assert not lines["rai_refusal.safety"]["ok"]  # a NaN never verifies
    assert lines["coherence"]["tolerance"] == TOLERANCES["coherence"]


def test_the_variant_organisms_are_recipes_of_their_own_and_the_shipped_one_is_unchanged():
    from em_bench.models import is_organism

    digests = {name: recipe.digest() for name, recipe in PRESETS.items()}
    assert len(set(digests.values())) == len(digests) >= 4
    assert PRESETS["organism"] == OrganismRecipe()  # the shipped organism's recipe
    assert PRESETS["organism-s1"].model_dump(exclude={"seed"}) == \
        OrganismRecipe().model_dump(exclude={"seed"})
    assert all(is_organism(name) for name in PRESETS)
