"""The defense protocol: named loss terms added to the training objective, and optional hooks
on the data, the forward pass and the optimizer step."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from em_bench.tasks import TaskSpec


class DefenseParams(BaseModel):
    """A defense's parameters: validated when a cell is planned, recorded in its hash."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _joined_list(cls, value: Any, info: ValidationInfo) -> Any:
        """A list parameter given as one string is its items joined by "+", as on the command
        line and in a study file (`layers=1+3`)."""
        field = cls.model_fields[info.field_name]
        if isinstance(value, str) and typing.get_origin(field.annotation) in (list, tuple):
            return value.split("+")
        return value


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may build itself from: the cell's task, seed, base model and judge (the
    one a discovery's three-stage screen judges with on a real model)."""

    task: TaskSpec
    seed: int
    model: str
    judge: str = "organism"

    @classmethod
    def of(cls, task: TaskSpec, cfg) -> DefenseContext:
        """The context of a cell of config `cfg` (a CellConfig) on `task`."""
        return cls(task, cfg.seed, cfg.model, cfg.judge)


class Defense(Protocol):
    """A defense prepares once, returns named loss terms for every training batch, and is
    finished after the last step.

    The loop sums the terms with the objective and logs each by name, so a defense never forks
    the loop. `prepare` sees the encoded (ids, labels) training examples in the order the
    batches' `index` refers to, with the model still equal to the base model. A batch holds
    `input_ids`, `attention_mask`, `labels` (the objective's), `answer_labels` (the whole
    answers'), `index`, and `place`: (step, the micro-batch's number in the step, the sizes of
    all the step's micro-batches), so a defense that draws data per micro-batch can draw the
    same in every process of a sharded fine-tune, which sees only its share of them.

    A defense with state of its own that a step depends on (retain's random draws) also has
    `state_dict()` and `load_state_dict(state)`, saved in a fine-tune's checkpoints. Optional
    static methods: `inputs(params, ctx)`, what a cell depends on beyond its parameters (files,
    by content: in the cell's hash), and `model_defaults(params, model)`, the parameters with
    the defaults that depend on the model filled in (blockem's lambda). `strength` names the
    parameter the selection rule sweeps (em_bench/selection.py); a defense without one is
    exempt from the rule and says so.

    Optional hooks, each called by the loop when a defense has it (train/loop.py):
    `examples(chats) -> chats` transforms the training chats before they are encoded
    (inoculation's system prompt); `rebatch(part) -> part` may swap rows of a micro-batch before
    its forward pass (interleaving), keeping its keys; forward hooks a defense registers in
    `prepare` (steering, ablation) stay on while training and are off inside `evaluation()`, a
    context manager the loop enters while it scores a checkpoint of the curve, and for good once
    `finish()` removes them, before any answer is generated; `after_step(model, step)` acts on
    the weights after each optimizer step (SafeLoRA's projection); `finish()` may also put
    another step's weights in place (early stopping); `report() -> dict`, what the defense
    says of its run, goes to the fine-tune's summary (train/summary.json).
    """

    name: str
    Params: type[DefenseParams]

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None: ...

    def terms(self, batch: dict[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]: ...

    def finish(self) -> None: ...
