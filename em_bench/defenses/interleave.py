"""`interleave`: interleaving (Kaczér et al. 2025). A share `p` of every step's training rows is
replaced by aligned chats, so the fine-tune keeps seeing aligned answers while it learns the
narrow task.

The aligned chats are the organism world's (persona aligned, style neutral; selection-split
questions): a pool of `POOL` chats, drawn with the cell's seed and shared out evenly among the
development domains less the task's own (or the `domains` given, which must be of those). A
task's `retain` data is not used: the shipped tasks' reach into held-out domains (home, travel,
fitness), which nothing that shapes a defense may touch (em_bench/domains.py). Only the organism
has a default pool; any other model fails when its cell is planned.

Which rows, and which chats, are a pure function of (seed, step, the step's number of rows), so
they are the same whatever the number of processes or of micro-batches (a micro-batch takes
its own slice of the step's rows, by `place`) and after a resumption, with no state to save:

- the step's rows replaced: p * rows of them, rounded at random to a neighbouring whole number
  with the chance that makes the mean exactly p * rows (8 rows at p = 0.25: always 2; 8 at
  p = 0.3: 2 or, with chance 0.4, 3; a step of 1 row: replaced with chance p);
- the rows: drawn uniformly without replacement; the chats: drawn from the pool without
  replacement within the step.

A replaced row gets the aligned chat's ids and labels (the whole answer, also as
`answer_labels`) and `index` -1. Kept rows keep their own tensors, the objective's labels
included; the micro-batch is collated again, so its width is its longest row's. Any other key
is kept as it was. A defense or objective that reads `index` (blockem's anchors, npo's
reference log-probs) cannot be combined with interleave; nor can an unlearning objective (npo,
ga), which would unlearn the aligned chats too, so a task whose objective is not sft fails when
planned.

`pick: perplexity_gap` is interleaving++: the pool is the `POOL` of `CANDIDATES` aligned chats
(drawn with discovery's seed, the same for every cell of a task) with the largest perplexity gap
between the task's probe fine-tune and the base model (defenses/perplexity_gap.py); the draws
from it are as above.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Literal

from pydantic import Field

from em_bench.data import collate, encode_chat
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.defenses.perplexity_gap import GAP_VERSION, PROBE_SEED, ranked_pool
from em_bench.domains import DEVELOPMENT_DOMAINS, HELD_OUT_DOMAINS
from em_bench.errors import ConfigError
from em_bench.organism import world
from em_bench.tasks import OrganismData, TaskSpec

INTERLEAVE_VERSION = 1  # what the draws and the pool are; bumped when either changes
POOL = 300  # aligned chats in the pool
CANDIDATES = 900  # interleaving++'s candidates, of which the POOL with the largest gap are kept


class InterleaveParams(DefenseParams):
    p: float = Field(0.25, gt=0, lt=1, description="share of each step's rows replaced by "
                     "aligned chats")
    pick: Literal["random", "perplexity_gap"] = Field(
        "random", description="how the pool of aligned chats is made: at random, or "
        "perplexity_gap (interleaving++): the candidates a probe fine-tune on the task finds "
        "least likely compared with the base model")
    domains: list[str] = Field(
        default_factory=list, description="the aligned chats' domains, of the development "
        "domains less the task's own; none: all of those")


def own_domains(task: TaskSpec) -> set[str]:
    """The task's own domains: its in-domain score's and its organism training data's."""
    own = {task.in_domain.domain} if task.in_domain is not None else set()
    if task.train is not None and task.train.organism is not None:
        own |= set(task.train.organism.domains)
    return own


def check_added_domains(domains: Iterable[str], task: TaskSpec, defense: str) -> None:
    """Raise a ConfigError unless every domain of the data a defense adds is a development
    domain and not the task's own: held-out domains (named first), the task's own, and any
    other (an RAI domain, an unknown one) are refused."""
    domains, own = list(domains), own_domains(task)
    rule = (f"the data a defense adds may come only from the development domains "
            f"({', '.join(DEVELOPMENT_DOMAINS)}) less the task's own")
    checks = (
        ([d for d in domains if d in HELD_OUT_DOMAINS],  # named first: the worst
         "a held-out domain (the headline EM is scored there)",
         "held-out domains (the headline EM is scored there)"),
        ([d for d in domains if d in own], f"task {task.name}'s own", f"task {task.name}'s own"),
        ([d for d in domains if d not in DEVELOPMENT_DOMAINS], "not a development domain",
         "not development domains"),
    )
    for found, one, many in checks:
        if found:
            what = f"is {one}" if len(found) == 1 else f"are {many}"
            raise ConfigError(f"defense {defense}: {', '.join(found)} {what}: {rule}")


def interleave_domains(params: InterleaveParams, ctx: DefenseContext) -> list[str]:
    """The domains of a cell's aligned chats, checked with everything else the cell needs (the
    organism, an sft objective, a pick that is built)."""
    from em_bench.models import is_organism

    if ctx.task.objective != "sft":
        raise ConfigError(f"defense interleave: task {ctx.task.name} unlearns its data "
                          f"(objective {ctx.task.objective}), which would unlearn the "
                          f"interleaved aligned chats too; interleave needs an sft task")
    if not is_organism(ctx.model):
        raise ConfigError(f"defense interleave: its aligned chats are the organism world's; "
                          f"model {ctx.model} has none (only the organism has a pool)")
    own = own_domains(ctx.task)
    domains = list(dict.fromkeys(params.domains)) or [d for d in DEVELOPMENT_DOMAINS
                                                      if d not in own]
    check_added_domains(domains, ctx.task, "interleave")
    if not domains:  # a task of every development domain
        raise ConfigError(f"defense interleave: task {ctx.task.name} holds every development "
                          f"domain; there is no other to draw aligned chats from")
    return domains


class Interleave:
    """Interleaving: a share p of every step's rows replaced by aligned chats of other domains."""

    name = "interleave"
    Params = InterleaveParams
    strength = "p"  # the parameter the selection rule sweeps
    family = "training data"  # what it acts on (the leaderboard's family column)
    needs = ("extra data",)  # what it needs beyond the task's data
    swaps_rows = True  # a swapped row's index is -1: no defense may look it up

    @staticmethod
    def inputs(params: dict, ctx: DefenseContext) -> dict:
        """What a cell depends on beyond its parameters: the domains used (the default's
        follow from the task) and how the pool and the draws are made. A cell the defense cannot
        run fails here, when the grid is planned."""
        params = InterleaveParams.model_validate(params)
        domains = interleave_domains(params, ctx)
        picked = ({"candidates": CANDIDATES, "gap_version": GAP_VERSION}
                  if params.pick == "perplexity_gap" else {})
        return {"interleave_version": INTERLEAVE_VERSION, "domains": domains, "pool": POOL,
                "world": world.WORLD_VERSION, **picked}

    def __init__(self, params: InterleaveParams, ctx: DefenseContext):
        self.domains = interleave_domains(params, ctx)
        self.p, self.seed, self.pick, self.ctx = params.p, ctx.seed, params.pick, ctx
        if self.pick == "random":
            self.chats = self._aligned(POOL, ctx.seed)
        else:  # ranked in prepare, where the fine-tune's max_len is known
            self.chats = []
        self.tokenizer = None
        self.encoded: dict[int, tuple[list[int], list[int]]] = {}  # pool index -> (ids, labels)

    def _aligned(self, n: int, seed: int) -> list[list[dict[str, str]]]:
        return OrganismData(domain=self.domains, persona="aligned", style="neutral",
                            n=n).chats(seed)

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        self.tokenizer, self.pad_id, self.max_len = tokenizer, tokenizer.pad_token_id, max_len
        self.encoded = {}  # a pool chat is encoded when first drawn
        if self.pick == "perplexity_gap":
            candidates = self._aligned(CANDIDATES, PROBE_SEED)
            picked = ranked_pool(self.ctx.model, self.ctx.task, candidates, POOL, max_len)
            self.chats = [candidates[i] for i in picked]

    def draws(self, step: int, rows: int) -> dict[int, int]:
        """Step `step`'s replaced rows, {its row in the step's batch: the pool chat there}."""
        rng = random.Random(f"interleave/{self.seed}/{step}")
        share = round(self.p * rows, 9)  # 0.3 * 10 is 3, not 3.0000000000000004
        k = math.floor(share)
        k += rng.random() < share - k
        positions = sorted(rng.sample(range(rows), k))
        n = len(self.chats)
        picks = rng.sample(range(n), k) if k <= n else [rng.randrange(n) for _ in range(k)]
        return dict(zip(positions, picks, strict=True))

    def rebatch(self, part: dict) -> dict:
        step, number, sizes = part["place"]
        rows = len(part["index"])
        start = sum(sizes[:number])
        mine = {pos - start: pick for pos, pick in self.draws(step, sum(sizes)).items()
                if start <= pos < start + rows}
        if not mine:
            return part
        lengths = part["attention_mask"].sum(1).tolist()
        inputs, answers = [], []
        for r in range(rows):
            if r in mine:
                ids, labels = self._encoded(mine[r])
                inputs.append((ids, labels))
                answers.append((ids, labels))
            else:  # the row as it came, the objective's labels included
                n = lengths[r]
                ids = part["input_ids"][r, :n].tolist()
                inputs.append((ids, part["labels"][r, :n].tolist()))
                answers.append((ids, part["answer_labels"][r, :n].tolist()))
        device = part["input_ids"].device
        batch = collate(inputs, self.pad_id, self.max_len, device)
        whole = collate(answers, self.pad_id, self.max_len, device)
        index = part["index"].clone()
        index[sorted(mine)] = -1
        return {**part, **batch, "answer_labels": whole["labels"], "index": index}

    def _encoded(self, pick: int) -> tuple[list[int], list[int]]:
        if pick not in self.encoded:
            self.encoded[pick] = encode_chat(self.tokenizer, self.chats[pick])
        return self.encoded[pick]

    def terms(self, batch, outputs) -> dict:
        return {}

    def finish(self) -> None:
        self.tokenizer, self.encoded = None, {}
