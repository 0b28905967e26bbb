"""`retain`: the augmented retain loss of the narrow-unlearning paper. Every step adds
beta * cross-entropy on a batch of the task's retain chats (answers the fine-tune must keep)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from pydantic import Field

from em_bench.data import collate, device_of, encode_chat
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.domains import DEVELOPMENT_DOMAINS, HELD_OUT_DOMAINS
from em_bench.errors import ConfigError
from em_bench.losses import sft_loss
from em_bench.tasks import chats


class RetainParams(DefenseParams):
    beta: float = Field(1.0, gt=0, description="weight of the retain cross-entropy")


class Retain:
    """Retain: a cross-entropy term on aligned chats of other domains, a batch each step."""

    name = "retain"
    Params = RetainParams
    strength = "beta"  # the parameter the selection rule sweeps
    family = "loss term"  # what it acts on (the leaderboard's family column)
    needs = ("extra data",)  # what it needs beyond the task's data

    @staticmethod
    def inputs(params: dict, ctx: DefenseContext) -> dict:
        return retain_inputs(params, ctx)

    def __init__(self, params: RetainParams, ctx: DefenseContext):
        retain_inputs(params, ctx)
        self.beta = params.beta
        self.chats = chats(ctx.task.retain, ctx.seed)
        self.rng = random.Random(f"retain/{ctx.seed}")
        self.step, self.draws = None, []

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        self.model, self.pad_id, self.max_len = model, tokenizer.pad_token_id, max_len
        self.retain = [encode_chat(tokenizer, c) for c in self.chats]

    def terms(self, batch, outputs) -> dict:
        step, part, sizes = batch["place"]
        if step != self.step:  # the step's draws in micro-batch order, whatever this process's
            self.step = step
            self.draws = [self.rng.sample(self.retain, min(n, len(self.retain))) for n in sizes]
        kept = collate(self.draws[part], self.pad_id, self.max_len, device_of(self.model))
        logits = self.model(input_ids=kept["input_ids"],
                            attention_mask=kept["attention_mask"]).logits
        return {self.name: self.beta * sft_loss(logits, kept["labels"])}

    def state_dict(self) -> dict:
        """What a resumed fine-tune needs to draw the same batches (taken between steps)."""
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])

    def finish(self) -> None:
        self.model = None


def retain_inputs(params, ctx: DefenseContext) -> dict:
    """What a retain cell depends on beyond its task spec: its retain file's content (an
    organism's retain chats are named by the spec itself). A task without retain data fails
    here, when the grid is planned."""
    if ctx.task.retain is None:
        raise ConfigError(f"defense retain: task {ctx.task.name} has no retain data; add "
                          f"'retain:' (chats to keep) to its task file")
    world_data = ctx.task.retain.organism
    if world_data is not None and (scored := set(world_data.domains) & set(HELD_OUT_DOMAINS)):
        raise ConfigError(f"defense retain: task {ctx.task.name}'s retain data draws on "
                          f"{', '.join(sorted(scored))}, held-out domains the headline EM is "
                          f"scored on; take it from the development domains "
                          f"({', '.join(DEVELOPMENT_DOMAINS)}) but the task's own")
    file = ctx.task.retain.file()
    return {} if file is None else {"retain_sha256": hashlib.sha256(
        Path(file).read_bytes()).hexdigest()}
