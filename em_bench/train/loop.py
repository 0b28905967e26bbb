"""The one training loop, top to bottom: batch, forward, objective, defense terms, backward, step,
log. Objectives and defenses only return named loss terms; the loop sums and logs them by name."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from contextlib import ExitStack, nullcontext

import torch
from tqdm.auto import tqdm

from em_bench.config import TrainConfig
from em_bench.data import Messages, collate, device_of, encode_chat
from em_bench.train.checkpoint import Checkpoints, StopOnSignal, capture, restore
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
    checkpoints: Checkpoints | None = None,
) -> dict[str, float]:
    """Fine-tune the trainable parameters of `model` in place for `cfg.total_steps` steps.

    `objective` is one of train.objectives (default: SFT). Examples are shuffled by `seed` and
    cycled epoch by epoch. A step's batch is split into `cfg.grad_accum` micro-batches whose
    gradients add up (the same step in less memory). Run by `cfg.processes` processes (torchrun,
    the model sharded with FSDP: train.distributed), each takes its share of the micro-batches
    and the gradients are averaged over them: the same step again. Every step's record (step,
    its lr and every named loss term) goes to `log`; `every_step(step, model)` runs after each
    step (the pipeline's checkpoint scores). With `checkpoints`, the training state is saved
    every `checkpoints.every` steps and, on SIGINT/SIGTERM, after the current step (then
    KeyboardInterrupt); a run finding one resumes from it. Returns the last step's terms.
    """
    # --- setup: encoded examples, optimizer, lr schedule ---
    if not examples:
        raise ValueError("train() needs at least one example")
    rng = random.Random(seed)
    batch_size = min(cfg.batch_size, len(examples))  # a tiny data set still yields batches
    micro = max(1, batch_size // cfg.grad_accum)
    rank, world = process_rank()
    if world != cfg.processes:
        raise RuntimeError(f"train: processes is {cfg.processes} but {world} run this loop "
                           f"(train.distributed launches them)")
    n_parts = -(-batch_size // micro)
    if n_parts % world:
        raise ValueError(f"a step's {n_parts} micro-batches (a batch of {batch_size} in parts of "
                         f"{micro}) do not divide among {world} processes")
    device = device_of(model)
    steps = cfg.total_steps(len(examples))
    for d in defenses:  # a defense that trains on other chats (inoculation's prompt) says so here
        if hasattr(d, "examples"):
            examples = d.examples(examples)
    encoded = [encode_chat(tokenizer, m) for m in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, steps))
    objective = objective or SFT()
    for d in defenses:
        d.prepare(model, tokenizer, encoded, cfg.max_len)
    whole = encoded  # the objective may cut the labels (to a phrase); defenses see whole answers
    encoded = objective.prepare(model, tokenizer, encoded, cfg.max_len)
    # after `prepare`, which must see the base model (blockem's anchors, npo's reference)
    saved = checkpoints.load() if checkpoints is not None else None
    start = 0 if saved is None else saved["step"]
    if saved is not None:
        restore(saved, model, opt, sched, defenses)
        logger.info("resuming the fine-tune after step %d of %d", start, steps)

    def batches(skip: int):
        """The batches from step `skip` on: the order is the seed's, replayed."""
        while True:
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                if skip:
                    skip -= 1
                    continue
                index = order[i : i + batch_size]
                batch = collate([encoded[j] for j in index], tokenizer.pad_token_id, cfg.max_len,
                                device)
                answers = collate([whole[j] for j in index], tokenizer.pad_token_id, cfg.max_len,
                                  device)
                yield {**batch, "index": torch.tensor(index, device=device),
                       "answer_labels": answers["labels"]}

    model.train()
    stream = batches(start)
    terms: dict[str, torch.Tensor] = {}
    stop = StopOnSignal(device) if checkpoints is not None else nullcontext()
    with stop:
        for step in tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step",
                         leave=False, disable=rank > 0):
            # --- forward and backward: the objective and every defense's terms, per micro-batch ---
            batch = next(stream)
            n = len(batch["index"])
            parts = [batch] if micro >= n else [{k: v[i : i + micro] for k, v in batch.items()}
                                                for i in range(0, n, micro)]
            sizes = tuple(len(p["index"]) for p in parts)
            parts = [{**p, "place": (step, i, sizes)} for i, p in enumerate(parts)]
            mine = parts[rank::world]
            terms = {}
            for i, part in enumerate(mine):
                for d in defenses:  # a defense may swap rows of the micro-batch (interleaving)
                    if hasattr(d, "rebatch"):
                        part = d.rebatch(part)
                if world > 1:  # sharded gradients are reduced once a step, after the last part
                    model.set_requires_gradient_sync(i == len(mine) - 1)
                out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
                part_terms = {objective.name: objective.loss(out.logits, part)}
                for d in defenses:
                    part_terms.update(d.terms(part, out))
                # FSDP averages the processes' gradients, so each divides by its own share
                (sum(part_terms.values()) / len(mine)).backward()
                for k, v in part_terms.items():  # the step's terms: the micro-batches' mean
                    terms[k] = terms.get(k, 0) + v.detach() / len(parts)
            if world > 1:
                terms = summed_over_processes(terms)
            # --- step ---
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = sched.get_last_lr()[0]  # this step's
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            for d in defenses:  # e.g. SafeLoRA's projection of the updated weights
                if hasattr(d, "after_step"):
                    d.after_step(model, step + 1)
            # --- log every term by name ---
            log({"step": step + 1, "lr": lr,
                 **{k: round(v.item(), 6) for k, v in terms.items()}})
            if every_step is not None:
                with ExitStack() as paused:  # a curve scores the model as it will answer
                    for d in defenses:
                        if hasattr(d, "evaluation"):
                            paused.enter_context(d.evaluation())
                    every_step(step + 1, model)
                model.train()
            done = step + 1
            if checkpoints is not None:  # after every_step: its curve row is done, RNG drawn
                stopping = stop.requested()
                if stopping or (done % checkpoints.every == 0 and done < steps):
                    state = capture(model, opt, sched, defenses, done, terms)
                    if rank == 0:
                        checkpoints.save(done, state)
                if stopping:
                    raise KeyboardInterrupt(f"stopped after step {done}; a rerun resumes there")
    for d in defenses:
        d.finish()
    model.eval()
    if not terms and saved is not None:  # resumed after the last step
        return saved["terms"]
    return {k: v.item() for k, v in terms.items()}


def process_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the distributed run, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def summed_over_processes(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    names = sorted(terms)
    values = torch.stack([terms[k].float() for k in names])
    dist.all_reduce(values)
    return dict(zip(names, values, strict=True))


def lr_factor(cfg: TrainConfig, step: int, steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a share of `cfg.lr`: a linear
    warmup over `warmup_steps`, then constant, or a linear decay reaching 0 after the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "linear":
        return max(0.0, (steps - step) / max(1, steps - cfg.warmup_steps))
    return 1.0
