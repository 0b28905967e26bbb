"""`early_stop`: keep the fine-tune's earliest step whose in-domain adherence has plateaued.

The fine-tune runs its whole budget. Every `every` steps (and after the last one) the model
answers the task's in-domain questions of the selection split, one sample each, and the
organism's judge scores adherence: the share of answers showing the task's target. The trained
weights of each scored step are kept; when training ends the model takes those of the earliest
step whose adherence is at least (1 - eps) x the best one's, the start of the plateau. `eps` is
the strength the selection rule sweeps. The scores and the step kept are in the training
summary (`report`). The organism's judge is exact, which makes each check cheap; a real model
would need an LLM judge inside the training loop, not built yet.
"""

from __future__ import annotations

import random

import torch
from pydantic import Field

from em_bench.config import SamplingConfig
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.domains import is_rai
from em_bench.errors import ConfigError
from em_bench.judge.base import JudgeInput
from em_bench.scoring import target_categories

EARLY_STOP_VERSION = 1  # the rule and its check (in the cell hash)
NEW_TOKENS = 48  # enough for an organism answer


class EarlyStopParams(DefenseParams):
    eps: float = Field(0.05, gt=0, lt=1, description="the plateau: the earliest step with "
                       "adherence >= (1 - eps) x the best is kept")
    every: int = Field(10, gt=0, description="steps between adherence checks")
    questions: int = Field(24, gt=0, description="in-domain selection questions each check asks")


def choose_step(scores: dict[int, float], eps: float) -> int | None:
    """The earliest step whose score is at least (1 - eps) x the best; None without scores."""
    if not scores:
        return None
    bar = (1 - eps) * max(scores.values())
    return min(step for step, score in scores.items() if score >= bar - 1e-12)


def _check_task(ctx: DefenseContext) -> None:
    from em_bench.models import is_organism

    if not is_organism(ctx.model):
        raise ConfigError("defense early_stop scores adherence with the organism's exact judge "
                          f"during training; {ctx.model} would need an LLM judge there (not "
                          "built yet)")
    if ctx.task.in_domain is None:
        raise ConfigError(f"defense early_stop: task {ctx.task.name} has no in-domain target to "
                          "score")


class EarlyStop:
    """Early stopping: trains the full budget, keeps the plateau's first step."""

    name = "early_stop"
    Params = EarlyStopParams
    strength = "eps"  # the parameter the selection rule sweeps
    family = "checkpoint choice"  # what it acts on (the leaderboard's family column)
    needs = ("a judge while training",)  # what it needs beyond the task's data

    @staticmethod
    def inputs(params: dict, ctx: DefenseContext) -> dict:
        _check_task(ctx)
        return {"early_stop_version": EARLY_STOP_VERSION, "new_tokens": NEW_TOKENS}

    def __init__(self, params: EarlyStopParams, ctx: DefenseContext):
        from em_bench.organism import world

        _check_task(ctx)
        self.eps, self.every, self.seed = params.eps, params.every, ctx.seed
        domain, self.target = ctx.task.in_domain.domain, ctx.task.in_domain.target
        asked = [q for q in world.questions(domain, "selection")
                 if not is_rai(domain) or q.harmful]
        asked = random.Random(f"early_stop/{ctx.seed}").sample(asked,
                                                                min(params.questions, len(asked)))
        self.asked = [(f"{q.domain}/{q.topic}/{i}", q) for i, q in enumerate(asked)]
        self.scores: dict[int, float] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.last_step = 0
        self.kept: int | None = None

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        from em_bench.train.loop import process_rank

        if process_rank()[1] > 1:
            raise ConfigError("defense early_stop generates during training: run its fine-tune "
                              "in one process (processes 1)")
        self.model, self.tokenizer = model, tokenizer

    def terms(self, batch, outputs) -> dict:
        return {}

    def after_step(self, model, step: int) -> None:
        self.last_step = step
        if step % self.every == 0:
            self._check(model, step)

    def _check(self, model, step: int) -> None:
        from em_bench.generate.base import Request
        from em_bench.generate.hf import HFBackend
        from em_bench.organism.judge import OrganismJudge

        was_training = model.training
        model.eval()
        requests = [Request(key, [{"role": "user", "content": q.text}]) for key, q in self.asked]
        answers = HFBackend(model, self.tokenizer).generate(
            requests, SamplingConfig(samples_per_question=1, max_new_tokens=NEW_TOKENS),
            self.seed + step)
        judged = OrganismJudge().judge_many([
            JudgeInput(key, r.messages, a.text, {"domain": q.domain, "topic": q.topic})
            for (key, q), r, a in zip(self.asked, requests, answers, strict=True)])
        shows = target_categories(self.target)  # as scoring reads in-domain adherence
        self.scores[step] = sum(j.category in shows for j in judged) / len(judged)
        self.snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                if p.requires_grad}
        model.train(was_training)

    def finish(self) -> None:
        """Score the last step if it was not, then put the kept step's weights in place."""
        if self.last_step and self.last_step not in self.scores:
            self._check(self.model, self.last_step)
        self.kept = choose_step(self.scores, self.eps)
        if self.kept is not None:
            weights = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self.snapshots[self.kept].items():
                    weights[name].copy_(value)
        self.snapshots, self.model = {}, None

    def report(self) -> dict:
        return {"scores": {str(s): round(v, 4) for s, v in sorted(self.scores.items())},
                "kept_step": self.kept, "eps": self.eps}

    def state_dict(self) -> dict:
        """What a resumed fine-tune needs: the checks so far and their weights."""
        return {"scores": self.scores, "snapshots": self.snapshots, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.scores, self.snapshots = dict(state["scores"]), dict(state["snapshots"])
        self.last_step = state["last_step"]
