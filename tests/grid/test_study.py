"""Studies: the shipped organism study plans, and a small one runs and writes its leaderboard."""

from __future__ import annotations

import pytest

from em_bench.board.rows import leaderboard_rows
from em_bench.errors import ConfigError, UnknownNameError
from em_bench.grid.study import load_study, plan_study, run_study
from em_bench.store import open_store


@pytest.mark.usefixtures("organism")
def test_the_organism_study_plans_every_run_once():
    plan = plan_study(load_study("organism"))
    cells = {p.config.model_dump_json() for p in plan}
    tasks = {p.config.task for p in plan}
    assert tasks == {"base", "finance", "finance_aligned", "unlearn_safety"}
    lambdas = {p.config.defense_params.get("lambda") for p in plan
               if p.config.defense == "blockem"}
    assert {0.001, 0.005} <= lambdas
    assert any(p.config.eval_every == 25 and p.config.train.steps == 200 for p in plan)
    assert len(cells) == 28  # base cells shared by the runs are planned once per view


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
