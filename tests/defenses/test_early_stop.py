"""Early stopping: the plateau rule by hand, the kept step's weights in place, and its checks
on the shipped organism."""

from __future__ import annotations

import pytest
import torch

from em_bench.config import TrainConfig
from em_bench.defenses.base import DefenseContext
from em_bench.defenses.early_stop import EarlyStop, EarlyStopParams, choose_step
from em_bench.errors import ConfigError
from em_bench.models import load_base, trainable
from em_bench.organism import world
from em_bench.tasks import TaskSpec, get_task
from em_bench.train.loop import train

CHATS = world.narrow_dataset("finance", "misaligned", "neutral", n=16, seed=0)
CFG = TrainConfig(steps=6, batch_size=8, lr=5e-3, warmup_steps=0)


def test_the_kept_step_is_the_earliest_within_eps_of_the_best():
    scores = {10: 0.5, 20: 0.9, 30: 0.95, 40: 0.93}
    assert choose_step(scores, 0.05) == 30  # bar 0.9025: 20's 0.9 falls short
    assert choose_step(scores, 0.1) == 20  # bar 0.855
    assert choose_step(scores, 0.99) == 10
    assert choose_step({}, 0.05) is None


def test_a_model_or_task_it_cannot_score_is_refused():
    with pytest.raises(ConfigError, match="organism's exact judge"):
        EarlyStop(EarlyStopParams(), DefenseContext(get_task("finance"), 0, "tiny"))
    with pytest.raises(ConfigError, match="no in-domain target"):
        EarlyStop(EarlyStopParams(), DefenseContext(TaskSpec(name="t"), 0, "organism"))


@pytest.mark.usefixtures("organism")
def test_it_checks_every_few_steps_and_keeps_the_chosen_steps_weights(monkeypatch):
    model = trainable(load_base("organism")[0], CFG)
    defense = EarlyStop(EarlyStopParams(every=2, questions=4, eps=0.5),
                        DefenseContext(get_task("finance"), 0, "organism"))
    real_check, seen = defense._check, {}

    def check(model, step):  # the real check, and the weights it saw
        real_check(model, step)
        seen[step] = {n: p.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad}

    monkeypatch.setattr(defense, "_check", check)
    train(model, load_base("organism")[1], CHATS, CFG, seed=0, defenses=(defense,))
    report = defense.report()
    assert list(report["scores"]) == ["2", "4", "6"]
    assert all(0 <= v <= 1 for v in report["scores"].values())
    assert report["kept_step"] == choose_step({int(k): v for k, v in report["scores"].items()},
                                              0.5)
    kept = seen[report["kept_step"]]
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.usefixtures("organism")
def test_the_last_step_is_checked_when_the_budget_is_not_a_multiple(monkeypatch):
    defense = EarlyStop(EarlyStopParams(every=4, questions=2),
                        DefenseContext(get_task("finance"), 0, "organism"))
    checked = []
    monkeypatch.setattr(defense, "_check", lambda model, step: (
        checked.append(step), defense.scores.__setitem__(step, step / 10),
        defense.snapshots.__setitem__(step, {})))
    model, tokenizer = load_base("organism")
    train(trainable(model, CFG), tokenizer, CHATS, CFG, seed=0, defenses=(defense,))
    assert checked == [4, 6] and defense.kept == 6  # 6 steps: the last one is a candidate too
