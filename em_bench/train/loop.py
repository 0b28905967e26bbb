"""The one training loop, top to bottom: batch, forward, objective, defense terms, backward, step,
log. Objectives and defenses only return named loss terms; the loop sums and logs them by name."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from em_bench.config import TrainConfig
from em_bench.data import Messages, collate, encode_chat
from em_bench.train.objectives import SFT

logger = logging.getLogger(__name__)


def train(
    model,
    tokenizer,
    examples: list[Messages],
    cfg: TrainConfig,
    seed: int,
    objective=None,
    defenses: tuple = (),
    log: Callable[[dict], None] = lambda record: None,
    every_step: Callable[[int, object], None] | None = None,
) -> dict[str, float]:
    """Fine-tune the trainable parameters of `model` in place for `cfg.steps` optimizer steps.

    `objective` is one of train.objectives (default: SFT). Examples are shuffled by `seed` and
    cycled epoch by epoch. Every step's record (step, lr and every named loss term) goes to
    `log`; `every_step(step, model)` runs after each step (the pipeline's checkpoint scores).
    Returns the last step's terms.
    """
    # --- setup: encoded examples, optimizer, constant lr after a linear warmup ---
    if not examples:
        raise ValueError("train() needs at least one example")
    rng = random.Random(seed)
    batch_size = min(cfg.batch_size, len(examples))  # a tiny data set still yields batches
    encoded = [encode_chat(tokenizer, m) for m in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    objective = objective or SFT()
    for d in defenses:
        d.prepare(model, tokenizer, encoded, cfg.max_len)
    whole = encoded  # the objective may cut the labels (to a phrase); defenses see whole answers
    encoded = objective.prepare(model, tokenizer, encoded, cfg.max_len)

    def batches():
        while True:
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                index = order[i : i + batch_size]
                batch = collate([encoded[j] for j in index], tokenizer.pad_token_id, cfg.max_len)
                answers = collate([whole[j] for j in index], tokenizer.pad_token_id, cfg.max_len)
                yield {**batch, "index": torch.tensor(index),
                       "answer_labels": answers["labels"]}

    model.train()
    stream = batches()
    terms: dict[str, torch.Tensor] = {}
    for step in tqdm(range(cfg.steps), desc="train", unit="step", leave=False):
        # --- forward: the objective and every defense's terms ---
        batch = next(stream)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        terms = {objective.name: objective.loss(out.logits, batch)}
        for d in defenses:
            terms.update(d.terms(batch, out))
        # --- backward and step ---
        loss = sum(terms.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        # --- log every term by name ---
        log({"step": step + 1, "lr": sched.get_last_lr()[0],
             **{k: round(v.item(), 6) for k, v in terms.items()}})
        if every_step is not None:
            every_step(step + 1, model)
            model.train()
    for d in defenses:
        d.finish()
    model.eval()
    return {k: v.item() for k, v in terms.items()}
