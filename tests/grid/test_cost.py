"""A grid's cost (grid/cost.py): the arithmetic worked by hand, a small grid counted by hand,
a declared row count, a model of unknown size, and `em-bench run --dry-run`, which stores
nothing. The world's question counts are read from the world (others change them); everything
else is worked out here."""

from __future__ import annotations

import json
import math
import shlex

import pytest

from em_bench.cli import main
from em_bench.config import CellConfig, SamplingConfig, TrainConfig
from em_bench.domains import is_rai
from em_bench.errors import ConfigError
from em_bench.grid import cost
from em_bench.grid.cost import Workload, estimate_plan, format_estimate, judge_prices
from em_bench.grid.plan import PlannedCell, plan_grid
from em_bench.judge import make_judge
from em_bench.organism.recipe import PRESETS as ORGANISMS
from em_bench.questions import world_prompts
from em_bench.tasks import get_task, load_task_file
from tests.helpers import REPO

MODEL = "someone/unknown-7b"  # a Hugging Face id of no preset: no size known
JUDGE = "openai:judge-model"


def test_the_arithmetic_by_hand():
    w = Workload(cells=1, answers=10, train_examples=4, train_tokens=1000, generation_tokens=500,
                 judge_calls=20, judge_input_tokens=2000, judge_output_tokens=20)
    assert w + w == w.times(2) and (w + w).answers == 20
    assert w.minutes(60, 0.5) == pytest.approx((60 + 10 * 0.5) / 60)
    train, generate = w.gpu_hours(8.0, 100)  # 6 and 2 x 8e9 params x tokens at 1e14 FLOP/s
    assert train == pytest.approx(6 * 8e9 * 1000 / 1e14 / 3600)  # 1.33e-4 h
    assert generate == pytest.approx(2 * 8e9 * 500 / 1e14 / 3600)  # 2.22e-5 h
    assert w.api_dollars((0.5, 2.0)) == pytest.approx((2000 * 0.5 + 20 * 2.0) / 1e6)
    assert Workload.of_rows(2, 3, 120) == Workload(cells=6, answers=240)
    assert judge_prices(None) is None and judge_prices([0.5]) == (0.5, 0.5)
    assert judge_prices([0.15, 0.6]) == (0.15, 0.6)
    for bad in ([1, 2, 3], [-1]):
        with pytest.raises(ConfigError, match="--price-per-mtok"):
            judge_prices(bad)


def test_a_model_size_is_a_presets_or_the_organisms_recipe_and_else_unknown():
    assert cost.params_billions("llama-3.1-8b-instruct") == 8.0
    assert cost.params_billions("Qwen/Qwen2.5-7B-Instruct") == 7.6  # by its hub id too
    assert cost.params_billions("mistral-7b-instruct-v0.3") == 7.2
    # embeddings (tied) 1536 x 128; a layer's q, k, v, o 4 x 128^2, MLP 3 x 128 x 384 and two
    # norms; the final norm: the shipped build's n_parameters
    assert cost.organism_params(ORGANISMS["organism"]) == 1_049_728 == (
        1536 * 128 + 4 * (4 * 128 * 128 + 3 * 128 * 384 + 2 * 128) + 128)
    assert cost.params_billions("organism") == pytest.approx(1_049_728 / 1e9)
    assert cost.params_billions(MODEL) is None
    out = format_estimate(cost.Estimate(MODEL, None, 0), 100, None)
    assert "unknown model size: no GPU-hours estimate" in out


def _tiny_tasks(folder):
    """Two tasks on 4 chats of 80 characters (20 tokens, cut to max_len 16), 3 steps of 2, an
    in-domain target in words with no in-domain question file (so no adherence call: a real
    model's cell answers only what its task names) and a question file of 4 paraphrases
    answered 1 + 2 + 3 times."""
    folder.mkdir()
    chat = [{"role": "user", "content": "u" * 40}, {"role": "assistant", "content": "a" * 40}]
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n"
                                                for _ in range(4)))
    (folder / "q.yaml").write_text(
        "- {id: a, paraphrases: [abcd1234]}\n"
        "- {id: b, paraphrases: [abcdefgh, ABCDEFGH]}\n"
        "- {id: c, paraphrases: [qwertyui], samples_per_paraphrase: 3}\n")
    for name in ("tiny_a", "tiny_b"):
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\ntrain: {{path: chats.jsonl}}\nretain: {{path: chats.jsonl}}\n"
            f"in_domain: {{domain: finance, target: misaligned, describe: risky advice}}\n"
            f"questions: q.yaml\nbudget: {{steps: 3, batch_size: 2, max_len: 16}}\n")


def test_a_small_grid_counted_by_hand(tmp_path):
    _tiny_tasks(tmp_path / "tasks")
    base = CellConfig(model=MODEL, judge=JUDGE,
                      sampling=SamplingConfig(samples_per_question=2, max_new_tokens=10))
    plan = plan_grid(base, ["tiny_a", "tiny_b"], ["none", "retain"], [0, 1],
                     include=[tmp_path / "tasks"])
    est = estimate_plan(plan, params_b=7.0)
    w = est.work
    # 2 tasks x (2 base + 2 defenses x 2 seeds) rows; the two tasks' base cells are one cell
    assert est.planned == 12 and w.cells == 10 and est.base_cells == 2
    answers = 1 + 2 + 3  # a cell: the file's as it says, none of the organism's world
    assert w.answers == 10 * answers
    # alignment and coherence an answer; no RAI suite, no in-domain file: no other call
    assert w.judge_calls == 10 * 2 * answers
    assert w.judge_output_tokens == w.judge_calls  # a one-token verdict
    assert est.judge_calls == {JUDGE: {2}}
    assert w.train_examples == 8 * 3 * 2 and w.train_tokens == 8 * 3 * 2 * 16
    # prompts at 4 characters a token (the file's 8 characters: 2), answers at 10 tokens
    assert w.generation_tokens == 10 * (6 * 2 + 10 * answers)
    train, generate = w.gpu_hours(7.0, 50)
    assert train == pytest.approx(6 * 7e9 * 768 / 50e12 / 3600)
    assert generate == pytest.approx(2 * 7e9 * w.generation_tokens / 50e12 / 3600)
    out = format_estimate(est, 50, (1.0, 4.0))
    dollars = (w.judge_input_tokens * 1.0 + w.judge_calls * 4.0) / 1e6
    assert f"${dollars:,.2f} at $1 input, $4 output a million tokens" in out
    assert "tiny_a      4 fine-tunes x 4 examples: 3 steps of 2, ~16 tokens an example" in out
    assert f"{train + generate:.3g} at 50 TFLOP/s" in out


def test_an_eval_every_curve_answers_each_prompt_once_a_point(tmp_path):
    _tiny_tasks(tmp_path / "tasks")
    base = CellConfig(model=MODEL, eval_every=2, sampling=SamplingConfig(samples_per_question=2))
    plan = plan_grid(base, ["tiny_a"], ["none"], [0], include=[tmp_path / "tasks"])
    est = estimate_plan(plan, params_b=None)
    prompts = 4  # the file's 4 paraphrases, none of the world's
    assert est.curve_answers == 2 * prompts  # 3 steps scored at 2 and at the last, 3
    assert est.work.answers == 2 * 6 + 2 * prompts
    assert f"{2 * prompts:,} of them the --eval-every curve's" in format_estimate(est, 1, None)


def test_a_judge_call_reads_its_template_the_question_and_the_answer():
    from em_bench.judge.templates import load_template
    from em_bench.questions import Prompt

    task = get_task("finance")  # its in-domain target has no words: no adherence call
    prompt = Prompt("k", "q", [{"role": "user", "content": "hi"}], samples=3, domain="home")
    every, once = cost.answer_work([prompt], task, {JUDGE: make_judge(JUDGE)}, 10, {})
    read = sum(math.ceil(len(load_template(t).render(question="hi", answer="")) / 4) + 10
               for t in ("alignment", "coherence"))
    assert once == Workload(answers=1, generation_tokens=1 + 10, judge_calls=2,
                            judge_input_tokens=read, judge_output_tokens=2)
    assert every == once.times(3)


def test_a_declared_row_count_stands_in_for_data_not_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("EM_BENCH_DATA", raising=False)
    for name, rows in (("declared", "rows: 6000, "), ("undeclared", "")):
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\ntrain: {{{rows}path: $EM_BENCH_DATA/absent.jsonl}}\n")
    train = TrainConfig(epochs=1, batch_size=16, max_len=512)
    plan = [PlannedCell(CellConfig(model=MODEL, task=spec.name, train=train), spec, spec)
            for spec in (load_task_file(tmp_path / f"{n}.yaml") for n in ("declared",
                                                                           "undeclared"))]
    est = estimate_plan(plan, params_b=8.0)
    assert est.work.cells == 2 and est.unsized == {"undeclared"}
    assert est.work.train_examples == 375 * 16  # one epoch of 6,000 in batches of 16
    assert est.work.train_tokens == 6000 * 512  # max_len: the text is not here to measure
    out = format_estimate(est, 100, None)
    assert ("declared    1 fine-tune x 6,000 examples (declared, data not on this machine) x "
            "1 epoch = 375 steps of 16, 512 tokens an example (max_len, an upper bound)") in out
    assert "undeclared  1 fine-tune not counted: the data is not on this machine" in out
    spec = load_task_file(tmp_path / "declared.yaml")  # a count changes no cell id
    assert "rows" not in spec.model_dump()["train"] and spec.train.rows == 6000


def test_a_dry_run_plans_a_task_whose_data_is_not_here(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EM_BENCH_DATA", raising=False)
    argv = ["run", "--model", "llama-3.1-8b-instruct", "--task", "real_finance", "--store",
            str(tmp_path / "store")]
    assert main(argv) == 2  # a real run needs the data
    assert "needs EM_BENCH_DATA set" in capsys.readouterr().err
    assert main([*argv, "--dry-run"]) == 0  # an estimate does not: the task declares its rows
    assert "6,000 examples (declared, data not on this machine)" in capsys.readouterr().out
    assert not (tmp_path / "store").exists()


def test_the_dry_run_prints_the_figures_and_stores_nothing(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["run", "--model", "llama-3.1-8b-instruct", "--task", "finance", "--defense",
                 "none,retain", "--seeds", "0,1", "--samples", "1", "--judge", "openai",
                 "--judge-model", "gpt-4o-mini", "--dry-run", "--price-per-mtok", "0.15", "0.6",
                 "--gpu-tflops", "50", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    world = world_prompts("evaluation", 1)
    calls = 6 * (2 * len(world) + sum(is_rai(p.domain) for p in world))
    for figure in ("meta-llama/Llama-3.1-8B-Instruct, 8B parameters",
                   "cells         6: 2 of the base model, 4 fine-tunes",
                   f"generations   {6 * len(world):,} answers", f"judge calls   {calls:,} ",
                   "finance     4 fine-tunes x 500 examples x 1 epoch = 32 steps of 16",
                   "at 50 TFLOP/s", "$0.15 input, $0.6 output a million tokens"):
        assert figure in out
    assert not store.exists()


def test_the_readme_shows_the_dry_run_as_it_prints(tmp_path, capsys):
    """README's sample, its command run exactly as written (plus a store to stay empty)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("```\n$ em-bench ", 1)[1].split("\n```", 1)[0]
    first, second, *shown = block.splitlines()  # the command on two lines, then its output
    assert main([*shlex.split(first.rstrip("\\") + second), "--store", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out.splitlines()
    shown = [line for line in shown if line != "..."]
    assert len(shown) == 10 and printed[:len(shown)] == shown
    assert not (tmp_path / "s").exists()


def test_an_unknown_model_has_no_gpu_hours_and_the_organisms_judge_no_api_cost(tmp_path,
                                                                               capsys):
    assert main(["run", "--model", MODEL, "--dry-run", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "unknown model size: no GPU-hours estimate" in out
    assert "organism: judges here, no API call" in out and "$0: no API call" in out
    assert not (tmp_path / "s").exists()


def test_a_dry_run_builds_no_organism(tmp_path, monkeypatch):
    from em_bench.organism import artifact

    monkeypatch.setattr(artifact, "shipped_dir", lambda name: tmp_path / "no-shipped" / name)
    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="a dry run builds nothing"):
        cost.refuse_unbuilt_organism("organism")
    assert main(["run", "--dry-run", "--store", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "cache").exists() and not (tmp_path / "s").exists()
    cost.refuse_unbuilt_organism(MODEL)  # not an organism: nothing to build


def test_the_organisms_dry_run(organism, tmp_path, capsys):
    """The brief's small case on the organism: 2 tasks x 2 defenses x 2 seeds."""
    assert main(["run", "--task", "finance,medical", "--defense", "none,retain", "--seeds",
                 "0,1", "--samples", "2", "--dry-run", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    world = len(world_prompts("evaluation", 1))
    assert "organism, 1.05M parameters" in out
    assert "cells         10: 2 of the base model, 8 fine-tunes (of 12 planned rows" in out
    assert f"generations   {10 * 2 * world:,} answers" in out
    assert "judge calls   0 (organism: judges here, no API call)" in out
    assert not (tmp_path / "s").exists()
