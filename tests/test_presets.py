"""Model presets: a name (or its hub id) finds its preset, and a preset's EM definition is the
default only when an LLM judges."""

from __future__ import annotations

from em_bench.presets import PRESETS, merge_preset, preset_of


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
