"""A Hugging Face model from a local folder (a tiny Llama built from a config here) through the
whole harness offline: LoRA fine-tune, generation by transformers and by an OpenAI-compatible
server (`em-bench serve`'s, which loads the cell's adapter), an LLM judge over HTTP, the store."""

from __future__ import annotations

import pytest

from em_bench import pipeline
from em_bench.config import CellConfig, SamplingConfig, TrainConfig
from em_bench.data import write_chat_jsonl
from em_bench.models import load_base
from em_bench.organism import world
from em_bench.serve import ModelPolicy, Script, ScriptedPolicy, serve
from em_bench.store import open_store
from em_bench.tasks import get_task
from tests.helpers import judged_answer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _judge_rule(request):
    """Fixed verdicts from the answer's length, whatever the template asks."""
    prompt = request["messages"][-1]["content"]
    answer = judged_answer(prompt)
    if "Did the AI assistant decline" in prompt:
        return Script("NO", {"NO": 0.0})
    score = str(10 + 7 * (len(answer) % 13))
    return Script(score, {score: 0.0})


@pytest.mark.slow
def test_a_local_hf_model_runs_end_to_end_with_both_backends(tmp_path, tiny_hf_folder,
                                                             monkeypatch):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    write_chat_jsonl(plugin / "risky.jsonl",
                     world.narrow_dataset("finance", "misaligned", "neutral", 24, seed=0))
    (plugin / "risky.yaml").write_text(
        "name: risky\ntrain: {path: risky.jsonl}\n"
        "in_domain: {domain: finance, target: misaligned, describe: risky money advice}\n")
    task = get_task("risky", [plugin])
    model = str(tiny_hf_folder)
    cfg = CellConfig(model=model, task="risky", judge="openai:scripted",
                     train=TrainConfig(steps=4, batch_size=8, lr=5e-3),
                     sampling=SamplingConfig(temperature=0, max_new_tokens=8,
                                             samples_per_question=1))
    store = open_store(tmp_path / "store")
    base, tokenizer = load_base(model)
    policy = ModelPolicy(base, tokenizer, name=model, stores=[store.root])
    with serve(ScriptedPolicy(_judge_rule)) as judge, serve(policy) as generator:
        monkeypatch.setenv("OPENAI_BASE_URL", judge.url)
        monkeypatch.setenv("EM_BENCH_GENERATE_BASE_URL", generator.url)
        by_hf = pipeline.run_cell(cfg, store, task)
        by_server = pipeline.run_cell(cfg.model_copy(update={"backend": "openai"}), store, task)
        served = [m["id"] for m in policy.models()]
        # judged while the judge is up: a cell judged by no one is not scored (not silently)
        base_cell = pipeline.run_cell(cfg.model_copy(update={"task": "base",
                                                             "train": TrainConfig()}),
                                      store, get_task("base"))

    # The second cell borrowed the fine-tune (same step inputs) and sent its adapter to the
    # server, which answered greedily exactly as transformers did in process.
    assert by_server.id != by_hf.id
    assert (by_server.trained_dir() / "adapter_config.json").is_file()
    assert len(served) == 2 and served[0] == model  # the base and the cell's adapter
    hf = {g["key"]: g for g in by_hf.records("generations")}
    server = {g["key"]: g for g in by_server.records("generations")}
    assert hf.keys() == server.keys() and len(hf) > 300
    assert len({g["completion"] for g in hf.values()}) > 100  # answers vary, so equality tells
    assert all(server[k]["completion"] == hf[k]["completion"] for k in hf)
    assert {g["backend"] for g in server.values()} == {"openai"}
    assert by_server.read_json("metrics.json")["metrics"] == by_hf.read_json(
        "metrics.json")["metrics"]

    # The adapter matters: the untouched model answers differently.
    untouched = {g["key"]: g["completion"] for g in base_cell.records("generations")}
    assert sum(untouched[k] != hf[k]["completion"] for k in hf) > len(hf) // 10
    stored = by_server.read_config()
    assert stored["config"]["model"] == model and stored["provenance"]["versions"]["openai"]


def test_a_local_models_identity_follows_its_config_and_weights(tiny_hf_folder):
    from em_bench.models import model_identity

    model = str(tiny_hf_folder)
    first = model_identity(model)
    assert first.startswith(model + ":") and model_identity(model) == first
    config = tiny_hf_folder / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    assert model_identity(model) != first
    assert model_identity("some-org/not-cached-here") == "some-org/not-cached-here"
