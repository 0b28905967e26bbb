"""Model presets: a name (or its hub id) finds its preset, and a preset's EM definition is the
default only when an LLM judges."""

from __future__ import annotations

from em_bench.presets import PRESETS, merge_preset
from em_bench.registry import preset_of


def test_a_preset_is_found_by_its_name_or_its_hub_id():
    llama = PRESETS["llama-3.1-8b-instruct"]
    assert preset_of("llama-3.1-8b-instruct") is llama
    assert preset_of("meta-llama/Llama-3.1-8B-Instruct") is llama
    assert preset_of("someone/else") is None and preset_of("organism") is None


def test_the_papers_preset_judges_em_on_its_rubric_only_with_an_llm_judge():
    llama = merge_preset("llama-3.1-8b-instruct", PRESETS["llama-3.1-8b-instruct"])
    assert llama.em_definition("openai:gpt-4o") == "rubric"
    assert llama.em_definition("organism") == llama.em_definition(None) == "alignment"
    other = merge_preset("someone/else", None)
    assert other.em_definition("openai:gpt-4o") == "alignment"


def test_the_cpu_preset_sizes_a_cell_for_a_cpu():
    smol = merge_preset("smollm2-135m-instruct", PRESETS["smollm2-135m-instruct"])
    assert smol.model == "smollm2-135m-instruct" and smol.dtype == "float32"
    assert smol.train["steps"] <= 100 and smol.train["lora"]["rank"] == 8
    assert smol.sampling["max_new_tokens"] == 64
    assert merge_preset("smollm2-135m-instruct", PRESETS["smollm2-135m-instruct"],
                        steps=3).train["steps"] == 3


def test_a_plugins_preset_is_found_like_a_built_in_one(tmp_path, monkeypatch):
    from tests.helpers import install_plugin

    install_plugin(tmp_path / "site", "mymodels", {"__init__.py": (
        "from em_bench.presets import ModelPreset\n"
        "TINY = ModelPreset('me/tiny-chat', train={'batch_size': 2}, params_b=0.01)\n")},
        {"em_bench.models": {"tiny-chat": "mymodels:TINY"}})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from em_bench.grid.cost import params_billions
    from em_bench.registry import model_settings, recipe_of

    assert preset_of("tiny-chat") is preset_of("me/tiny-chat") is not None
    # what every command, a tuning and a study take from it: its hub id and its recipe
    assert model_settings("tiny-chat").model == "me/tiny-chat"
    assert recipe_of("me/tiny-chat") == {"batch_size": 2}
    assert params_billions("me/tiny-chat") == 0.01
