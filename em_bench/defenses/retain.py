"""`retain`: the augmented retain loss of the narrow-unlearning paper. Every step adds
beta * cross-entropy on a batch of the task's retain chats (answers the fine-tune must keep)."""

from __future__ import annotations

import random

from pydantic import Field

from em_bench.data import collate, encode_chat
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.errors import ConfigError
from em_bench.tasks import chats
from em_bench.train.objectives import sft_loss


class RetainParams(DefenseParams):
    beta: float = Field(1.0, gt=0, description="weight of the retain cross-entropy")


class Retain:
    name = "retain"
    Params = RetainParams

    def __init__(self, params: RetainParams, ctx: DefenseContext):
        if ctx.task.retain is None:
            raise ConfigError(f"defense retain: task {ctx.task.name} has no retain data; add "
                              f"'retain:' (chats to keep) to its task file")
        self.beta = params.beta
        self.chats = chats(ctx.task.retain, ctx.seed)
        self.rng = random.Random(f"retain/{ctx.seed}")

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        self.model, self.pad_id, self.max_len = model, tokenizer.pad_token_id, max_len
        self.retain = [encode_chat(tokenizer, c) for c in self.chats]

    def terms(self, batch, outputs) -> dict:
        picks = self.rng.sample(self.retain, min(len(batch["index"]), len(self.retain)))
        kept = collate(picks, self.pad_id, self.max_len)
        logits = self.model(input_ids=kept["input_ids"],
                            attention_mask=kept["attention_mask"]).logits
        return {self.name: self.beta * sft_loss(logits, kept["labels"])}

    def finish(self) -> None:
        self.model = None
