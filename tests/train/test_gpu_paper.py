"""The paper's BLOCK-EM on the paper's model (run with `pytest -m gpu` on a CUDA machine that can
download meta-llama/Llama-3.1-8B-Instruct, a gated model: log in with `huggingface-cli login`,
and Goodfire's layer-19 SAE through sae-lens): `blockem` with no latent file, at the preset's
paper defaults (SAE, layer, K, lambda and the three-stage screen), judged by a scripted judge
served over HTTP. This machine has no GPU, so this file is deselected here."""

from __future__ import annotations

import pytest

from em_bench.config import CellConfig, SamplingConfig
from em_bench.errors import NoLatentKept
from em_bench.serve import Script, ScriptedPolicy, serve
from em_bench.store import open_store
from tests.helpers import judged_answer

pytestmark = pytest.mark.gpu

MODEL = "llama-3.1-8b-instruct"
TASK = "own_risky_finance"  # em-bench's own data: the paper's is not shipped


def _judge(request):
    """Fixed verdicts by the answer's length: what is tested is the flow, not the figures."""
    prompt = request["messages"][-1]["content"]
    answer = judged_answer(prompt)
    if "five-point scale" in prompt:
        verdict = "5" if len(answer) % 3 == 0 else "1"
    elif "Did the AI assistant decline" in prompt:
        verdict = "NO"
    else:  # coherence and in-domain adherence, 0-100
        verdict = "90"
    return Script(verdict, {verdict: 0.0})


def _run(store, monkeypatch, url: str, values: dict | None = None):
    from em_bench.grid.plan import plan_grid
    from em_bench.grid.run import run_grid

    monkeypatch.setenv("OPENAI_BASE_URL", url)
    base = CellConfig(model=MODEL, judge="openai:scripted",
                      sampling=SamplingConfig(samples_per_question=1, max_new_tokens=48))
    plan = plan_grid(base, [TASK], ["blockem"], [0], {"steps": 20}, defense_values=values)
    rows = run_grid(store, plan)
    (cell,) = [store.cell(r["cell_id"]) for r in rows if r["task"] == TASK]
    return cell


def _penalty_grows(cell) -> None:
    log = cell.records("train/log")
    assert log[0]["blockem"] == pytest.approx(0.0, abs=1e-6)  # the LoRA starts at the base
    assert max(r["blockem"] for r in log) > 0


def test_the_papers_blockem_runs_on_its_model_with_no_latent_file(tmp_path, monkeypatch):
    import torch

    from em_bench.defenses import check_defense

    assert torch.cuda.is_available()
    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path / "cache"))
    params = check_defense("blockem", {}, MODEL)
    assert (params["form"], params["lambda"]) == ("sae", 1.3e4)  # the preset's, as the paper
    store = open_store(tmp_path / "store")
    with serve(ScriptedPolicy(_judge)) as judge:
        # the three-stage screen at the paper's settings: a scripted judge may leave it nothing
        # to keep, which is then a recorded finding, not a crash
        try:
            cell = _run(store, monkeypatch, judge.url)
        except NoLatentKept as found:
            assert "at layer 19" in str(found)
        else:
            method = cell.read_config()["method"]
            assert (method["form"], method["layers"], method["selection"]) == (
                "sae", [19], "three-stage")
            _penalty_grows(cell)
        # stage 1 alone always keeps K latents: the penalty on the real SAE starts at 0, grows
        cell = _run(store, monkeypatch, judge.url, {"selection": ["top-delta"]})
        assert cell.read_config()["method"]["k"] == 20
        _penalty_grows(cell)
