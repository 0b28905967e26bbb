"""Studies: the shipped organism study plans, and a small one runs and writes its leaderboard."""

from __future__ import annotations

import pytest

from em_bench.board.rows import leaderboard_rows
from em_bench.errors import ConfigError, UnknownNameError
from em_bench.grid.study import Pick, Study, load_study, plan_study, run_study
from em_bench.registry import DEFENSES
from em_bench.store import open_store


@pytest.mark.usefixtures("organism")
def test_the_organism_study_plans_every_run_once_at_its_picks(monkeypatch):
    from em_bench.organism import build

    # the variant organisms stand in for themselves by the shipped one's folder: planning
    # names each cell by its model's weights, and a test must not build three organisms
    shipped = build.ensure_organism("organism")
    monkeypatch.setattr(build, "ensure_organism", lambda name="organism": shipped)
    study = load_study("organism")
    picks = {tuned.key(): Pick(DEFENSES.get(tuned.defense).strength, None)
             for tuned in study.tune.defenses}
    picks[("kl", ())] = Pick("weight", 0.1)  # kl tuned; the others had no admissible strength
    plan = plan_study(study, picks=picks)
    cells = {p.config.model_dump_json() for p in plan}
    assert {p.config.task for p in plan} == {"base", "finance", "finance_aligned", "medical",
                                             "legal", "unlearn_safety"}
    organisms = {"organism", "organism-s1", "organism-s2", "organism-villain40"}
    assert {p.config.model for p in plan} == organisms
    headline = ("finance", "medical", "legal")  # each on every organism
    assert ({(p.config.task, p.config.model) for p in plan if p.config.task in headline}
            == {(task, model) for task in headline for model in organisms})
    kl = {p.config.defense_params["weight"] for p in plan if p.config.defense == "kl"}
    assert kl == {0.1}  # every kl cell at the pick, on every organism and task
    def forms(plan) -> set:
        return {(p.config.defense_params["form"], p.config.defense_params["selection"],
                 tuple(p.config.defense_params["layers"]))
                for p in plan if p.config.defense == "blockem"}

    assert forms(plan) == {("directions", None, ()), ("sae", None, ()), ("sae", None, (3,)),
                           ("sae", "top-delta", ()), ("sae", "random", ())}
    assert any(p.config.eval_every == 25 and p.config.train.steps == 200 for p in plan)
    # a cell two runs share is planned once (a base cell once per task's view of it)
    assert len({(p.config.model_dump_json(), p.view.name) for p in plan}) == len(plan)
    assert len(cells) < len(plan)
    # a form whose discovery kept no latent is not run (its tuning record says why)
    picks[("blockem", (("form", "sae"),))] = Pick("lambda", None, "kept no latent")
    assert forms(plan_study(study, picks=picks)) == {
        ("directions", None, ()), ("sae", None, (3,)), ("sae", "top-delta", ()),
        ("sae", "random", ())}
    del picks[("kl", ())]
    with pytest.raises(ConfigError, match="kl has no pick: add it to the study's tune section"):
        plan_study(study, picks=picks)


def test_a_study_on_a_preset_model_trains_answers_and_judges_as_its_run_would(monkeypatch):
    from em_bench.grid import study as study_module
    from em_bench.grid.plan import plan_grid

    # planned without reading the model (its weights are not on this machine) or its data
    monkeypatch.setattr(study_module, "plan_grid", lambda *a, **kw: plan_grid(
        *a, **kw, resolve_cells=False))
    study = Study.model_validate({"name": "real", "runs": [
        {"tasks": ["real_finance"], "defenses": ["none", "kl"], "seeds": [0], "steps": 3,
         "samples": 2}]})
    plan = plan_study(study, "llama-3.1-8b-instruct", judge="openai:a-judge")
    assert {(c.model, c.dtype, c.judge, c.metrics.em_definition) for c in
            (p.config for p in plan)} == {
        ("meta-llama/Llama-3.1-8B-Instruct", "bfloat16", "openai:a-judge", "rubric")}
    assert {(p.config.sampling.samples_per_question, p.config.sampling.max_new_tokens)
            for p in plan} == {(2, 600)}
    assert {(p.config.train.steps, p.config.train.lora.rank) for p in plan
            if p.config.task == "real_finance"} == {(3, 32)}  # the preset's recipe, steps over it


def test_a_study_names_its_problems(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown study 'organsim'.*Did you mean organism"):
        load_study("organsim")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nruns: [{tasks: [finance], seed: [0]}]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: .*seed"):
        load_study(bad)


@pytest.mark.slow
@pytest.mark.usefixtures("organism")
def test_a_small_study_runs_and_writes_its_leaderboard(tmp_path):
    study = tmp_path / "small.yaml"
    study.write_text("name: small\nruns:\n  - {tasks: [medical], defenses: [none, blockem], "
                     "steps: 6, samples: 1}\n")
    store = open_store(tmp_path / "store")
    index = run_study(load_study(study), store, tmp_path / "site")
    rows = leaderboard_rows(store)
    assert [(r["task"], r["defense"]) for r in rows] == [
        ("base", "none"), ("medical", "none"), ("medical", "blockem")]
    page = index.read_text()
    # each cell records what its defense is: the row says it
    assert "directions L0,1,2,3 K=5 principal-shift hinge=squared lambda=0.002" in page
    assert 'data-key="needs" data-value="latents (SAE or directions)"' in page
    assert index.name == "index.html" and all(r["cell_ids"][0] in page for r in rows)
