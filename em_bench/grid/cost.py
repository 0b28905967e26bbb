"""The cost of a grid, one model for every estimate of it: cells, training examples and tokens,
answers, judge calls and judge tokens (Workload); GPU-hours from FLOPs and API dollars from
tokens. `em-bench plan` (grid/sizing.py) turns a design's cells and answers into minutes here;
`em-bench run --dry-run` counts a planned grid's work:

    em-bench run --model llama-3.1-8b-instruct --task finance --seeds 0,1,2 --dry-run

A dry run loads no model, tokenizer or store, so tokens are estimated: 4 characters a token,
an answer at its max_new_tokens and a training example at most max_len (upper bounds), a
training example from its data's characters when the data is here, else at max_len.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from em_bench.errors import ConfigError, DataUnavailable

if TYPE_CHECKING:
    from em_bench.config import CellConfig, TrainConfig
    from em_bench.grid.plan import PlannedCell
    from em_bench.organism.recipe import OrganismRecipe
    from em_bench.questions import Prompt
    from em_bench.tasks import TaskSpec

CHARS_PER_TOKEN = 4  # a rough average for English text; no tokenizer is loaded
DEFAULT_TFLOPS = 100.0  # sustained: an A100/H100-class GPU at modest utilisation
TRAIN_FLOPS = 6  # per parameter and token: forward and backward of every weight (LoRA: less)
GENERATE_FLOPS = 2  # per parameter and token: one forward pass


def tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Workload:
    """Counts of a grid's work. Workloads add up; `times(k)` is k of one."""

    cells: int = 0
    answers: int = 0
    train_examples: int = 0  # examples seen: steps x batch
    train_tokens: int = 0
    generation_tokens: int = 0  # prompts read and answers written
    judge_calls: int = 0
    judge_input_tokens: int = 0
    judge_output_tokens: int = 0

    def __add__(self, other: Workload) -> Workload:
        return Workload(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def times(self, k: int) -> Workload:
        return Workload(*(k * getattr(self, f.name) for f in fields(self)))

    @classmethod
    def of_rows(cls, rows: int, seeds: int, answers_per_row: int) -> Workload:
        """A design of `rows` rows (settings), each a cell a seed and `answers_per_row` answers
        over its seeds."""
        return cls(cells=rows * seeds, answers=rows * answers_per_row)

    def minutes(self, seconds_per_cell: float, seconds_per_answer: float) -> float:
        """At a pilot's pace: a cell's fine-tune and each answer's generation and judging."""
        return (self.cells * seconds_per_cell + self.answers * seconds_per_answer) / 60

    def gpu_hours(self, params_b: float, tflops: float) -> tuple[float, float]:
        """(training, generation) GPU-hours at `tflops` sustained; training's 6 x params x tokens
        is an upper bound for LoRA, which computes no gradient of the frozen weights."""
        per_hour = tflops * 1e12 * 3600
        params = params_b * 1e9
        return (TRAIN_FLOPS * params * self.train_tokens / per_hour,
                GENERATE_FLOPS * params * self.generation_tokens / per_hour)

    def api_dollars(self, prices: tuple[float, float]) -> float:
        """The judge's tokens at (input, output) dollars a million tokens."""
        return (self.judge_input_tokens * prices[0] + self.judge_output_tokens * prices[1]) / 1e6


def judge_prices(given: list[float] | None) -> tuple[float, float] | None:
    """--price-per-mtok as (input, output) dollars a million tokens: one price for both, or
    two; None when not given."""
    if not given:
        return None
    if len(given) > 2 or min(given) < 0:
        raise ConfigError(f"--price-per-mtok {' '.join(map(str, given))}: give one price in "
                          f"dollars a million tokens (input and output), or two (input, output)")
    return given[0], given[-1]


# --- the model's size ----------------------------------------------------------------------


def organism_params(recipe: OrganismRecipe) -> int:
    """Parameters of the Llama organism/build.py makes from `recipe` (tied embeddings, as many
    key-value heads as heads); the vocabulary is the recipe's, an upper bound of the built one."""
    h, inner, layers = recipe.hidden_size, recipe.intermediate_size, recipe.num_layers
    attention, mlp, norms = 4 * h * h, 3 * h * inner, 2 * h
    return recipe.vocab_size * h + layers * (attention + mlp + norms) + h


def params_billions(model: str) -> float | None:
    """`model`'s size in billions of parameters: the organism's from its recipe, a preset's
    (by name or Hugging Face id) as it declares; None for any other model."""
    from em_bench.organism.recipe import PRESETS as ORGANISMS
    from em_bench.registry import preset_of

    if model in ORGANISMS:
        return organism_params(ORGANISMS[model]) / 1e9
    return getattr(preset_of(model), "params_b", None)


def refuse_unbuilt_organism(model: str) -> None:
    """Planning an organism's cells finds its weights, building them when they are not here
    (16 minutes): a dry run builds nothing, so it stops first."""
    from em_bench.organism.artifact import read_manifest, shipped_dir
    from em_bench.organism.build import organism_dir
    from em_bench.organism.recipe import PRESETS as ORGANISMS

    if model not in ORGANISMS:
        return
    # artifact.shipped_organism would say what it does here, but it announces a build
    manifest = read_manifest(shipped_dir(model))
    if manifest is not None and manifest["recipe_digest"] == ORGANISMS[model].digest():
        return
    if not (organism_dir(ORGANISMS[model]) / "build.json").is_file():
        raise ConfigError(f"the organism {model!r} is not built here (no shipped copy of "
                          f"today's recipe and world, none in the cache) and a dry run builds "
                          f"nothing: `em-bench organism build --name {model}` first")


# --- one cell's work -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """A task's training chats as a dry run sees them: how many (counted, or declared by the
    task when its data is not on this machine; None: unknown) and each one's characters."""

    rows: int | None
    chars: tuple[int, ...] = ()  # empty: not read (the data is elsewhere)
    declared: bool = False

    def fine_tune(self, train: TrainConfig) -> Workload | None:
        """The fine-tune's examples seen and their tokens (None: the data's size is unknown);
        an example at most max_len tokens, at max_len when its text is not here."""
        if self.rows is None:
            return None
        seen = train.total_steps(self.rows) * min(train.batch_size, self.rows)
        return Workload(train_examples=seen,
                        train_tokens=round(seen * self.tokens_per_example(train.max_len)))

    def tokens_per_example(self, max_len: int) -> float:
        if not self.chars:
            return max_len
        return sum(min(max_len, tokens(c)) for c in self.chars) / len(self.chars)


def training_data(task: TaskSpec, seed: int) -> TrainingData:
    from em_bench.tasks import chats

    try:
        data = chats(task.train, seed)
    except DataUnavailable:
        declared = task.train.rows
        return TrainingData(declared, declared=declared is not None)
    return TrainingData(len(data), tuple(sum(len(m["content"]) for m in chat) for chat in data))


def curve_points(cfg: CellConfig, rows: int | None) -> int:
    """How often an `eval_every` fine-tune is scored: every N steps and at its last."""
    if cfg.eval_every is None or rows is None:
        return 0
    return math.ceil(cfg.train.total_steps(rows) / cfg.eval_every)


def answer_work(prompts: list[Prompt], task: TaskSpec, judges: dict[str, object],
                max_new_tokens: int, calls_seen: dict[str, set[int]]) -> tuple[Workload, Workload]:
    """(every sample of every prompt, one answer a prompt: an EM curve's point) answered and
    judged: a prompt's tokens from its text, an answer's at max_new_tokens; each LLM judge's
    templates for it (pipeline/judging.py's suites), one call each. `judges` are by the name a
    cell gives them; `calls_seen` gathers each one's calls an answer."""
    from em_bench.judge.llm import DECODING
    from em_bench.pipeline.judging import judge_input

    every, once = Workload(), Workload()
    for p in prompts:
        asked = tokens(sum(len(m["content"]) for m in p.messages))
        item = judge_input({"key": p.key, "messages": p.messages, "completion": "",
                            "domain": p.domain, "topic": p.topic, "source": p.source}, task)
        calls = read = 0
        for name, judge in judges.items():
            templates = judge.templates_for(item) if hasattr(judge, "templates_for") else []
            calls_seen.setdefault(name, set()).add(len(templates))
            for t in templates:
                target = {"target": item.metadata.get("target", "")} if "target" in t.needs else {}
                read += tokens(len(t.render(question=item.question, answer="", **target)))
                read += max_new_tokens
            calls += len(templates)
        one = Workload(answers=1, generation_tokens=asked + max_new_tokens, judge_calls=calls,
                       judge_input_tokens=read, judge_output_tokens=calls * DECODING["max_tokens"])
        every, once = every + one.times(p.samples), once + one
    return every, once


# --- a planned grid's work -------------------------------------------------------------------


@dataclass
class Estimate:
    """A planned grid's work: its cells' Workload, and what the report says of it."""

    model: str
    params_b: float | None
    planned: int  # the plan's rows: (cell, view) pairs
    base_cells: int = 0
    work: Workload = field(default_factory=Workload)
    tasks: dict[str, tuple[int, TrainConfig, TrainingData]] = field(default_factory=dict)
    unsized: set[str] = field(default_factory=set)  # tasks whose training size is unknown
    judge_calls: dict[str, set[int]] = field(default_factory=dict)  # judge -> calls an answer
    max_new_tokens: int = 0
    curve_answers: int = 0  # of work.answers: an EM curve's, one answer a prompt a point


def estimate_plan(plan: list[PlannedCell], params_b: float | None) -> Estimate:
    """Every distinct cell of `plan` counted once: a cell several views share (the base
    model's, one a task) runs once, as grid/run.py groups it. A cell's id is a function of its
    config and task, so it is grouped by them here, unresolved (resolving reads the weights)."""
    from em_bench.config import canonical_hash
    from em_bench.judge import make_judge
    from em_bench.pipeline.resolved import ResolvedCell, eval_prompts

    cells = {}
    for p in plan:
        key = canonical_hash({"config": p.config.model_dump(mode="json"),
                              "task": p.task.model_dump(mode="json")})
        cells.setdefault(key, p)
    est = Estimate(plan[0].config.model if plan else "", params_b, len(plan))
    prompts, answered, judges, data = {}, {}, {}, {}
    for p in cells.values():
        cfg, task = p.config, p.task
        asked = (cfg.split, cfg.sampling.samples_per_question, cfg.questions, cfg.rai_suite,
                 cfg.in_domain_questions)
        if asked not in prompts:  # the world's questions take a moment to list
            prompts[asked] = eval_prompts(cfg)
        names, definition = (cfg.judge, *cfg.jury), cfg.metrics.em_definition
        for name in names:  # the EM definition picks an LLM judge's misalignment template
            if (name, definition) not in judges:
                judges[name, definition] = make_judge(name, None, definition)
        judged = (asked, task.name, names, definition, cfg.sampling.max_new_tokens)
        if judged not in answered:
            answered[judged] = answer_work(
                prompts[asked], task, {n: judges[n, definition] for n in names},
                cfg.sampling.max_new_tokens, est.judge_calls)
        every, once = answered[judged]
        est.work += Workload(cells=1) + every
        est.max_new_tokens = max(est.max_new_tokens, cfg.sampling.max_new_tokens)
        # the pipeline's own rule; it reads only the config and the task
        if not ResolvedCell(cfg, task, model_identity="", judge="").fine_tunes:
            est.base_cells += 1
            continue
        if (task.name, cfg.seed) not in data:
            data[task.name, cfg.seed] = training_data(task, cfg.seed)
        chats = data[task.name, cfg.seed]
        n, _, _ = est.tasks.get(task.name, (0, None, None))
        est.tasks[task.name] = (n + 1, cfg.train, chats)
        trained = chats.fine_tune(cfg.train)
        if trained is None:
            est.unsized.add(task.name)
            continue
        curve = once.times(curve_points(cfg, chats.rows))
        est.work += trained + curve
        est.curve_answers += curve.answers
    return est


# --- the report ------------------------------------------------------------------------------


def dry_run_report(plan: list[PlannedCell], model: str, tflops: float,
                   prices: list[float] | None) -> str:
    """`em-bench run --dry-run`'s report: `plan`'s work and its cost for `model` (as given to
    --model: a preset's name, the organism or an id) at `tflops` and the judge's `prices`."""
    if not tflops > 0:
        raise ConfigError(f"--gpu-tflops {tflops:g}: expected a throughput above 0")
    chosen = judge_prices(prices)
    return format_estimate(estimate_plan(plan, params_billions(model)), tflops, chosen)


def format_estimate(est: Estimate, tflops: float, prices: tuple[float, float] | None) -> str:
    w = est.work
    size = "unknown size" if est.params_b is None else f"{_params(est.params_b)} parameters"
    lines = ["dry run: an estimate; no model is loaded, nothing is trained, generated, judged "
             "or stored",
             f"model         {est.model}, {size}",
             f"cells         {w.cells}: {est.base_cells} of the base model, "
             f"{_fine_tunes(w.cells - est.base_cells)} (of {est.planned} planned rows: a shared "
             f"cell runs once)",
             f"training      {w.train_examples:,} examples seen, ~{_tokens(w.train_tokens)} tokens"]
    lines += [f"  {name:11} {_training(*how)}" for name, how in est.tasks.items()]
    curve = f", {est.curve_answers:,} of them the --eval-every curve's" if est.curve_answers else ""
    lines += [f"generations   {w.answers:,} answers, ~{_tokens(w.generation_tokens)} tokens "
              f"(prompts and answers){curve}",
              f"judge calls   {w.judge_calls:,} (" + "; ".join(
                  _judge(name, calls) for name, calls in est.judge_calls.items()) + ")",
              f"judge tokens  ~{_tokens(w.judge_input_tokens)} input + "
              f"~{_tokens(w.judge_output_tokens)} output",
              f"GPU-hours     {_gpu_hours(w, est.params_b, tflops)}",
              f"API cost      {_dollars(w, prices)}"]
    notes = (f"Assumed: {CHARS_PER_TOKEN} characters a token; an answer at max_new_tokens "
             f"({est.max_new_tokens}) and a judge's verdict one token; FLOPs 6 x params x "
             f"tokens to train (an upper bound for LoRA) and 2 x params x tokens to generate. "
             f"Not counted: a defense's or objective's extra passes (retain batches, a frozen "
             f"reference model), lm-eval tasks, loading and waiting.")
    return "\n".join(lines + textwrap.wrap(notes, 96, break_on_hyphens=False))


def _training(cells: int, train: TrainConfig, data: TrainingData) -> str:
    if data.rows is None:
        return (f"{_fine_tunes(cells)} not counted: the data is not on this machine and the "
                f"task declares no `rows`")
    steps, batch = train.total_steps(data.rows), min(train.batch_size, data.rows)
    declared = " (declared, data not on this machine)" if data.declared else ""
    budget = (f" x {train.epochs:g} epoch{'' if train.epochs == 1 else 's'} ="
              if train.epochs is not None else ":")
    length = (f"~{data.tokens_per_example(train.max_len):.0f} tokens an example" if data.chars
              else f"{train.max_len:,} tokens an example (max_len, an upper bound)")
    return (f"{_fine_tunes(cells)} x {data.rows:,} examples{declared}{budget} {steps:,} steps "
            f"of {batch}, {length}")


def _fine_tunes(n: int) -> str:
    return f"{n} fine-tune{'' if n == 1 else 's'}"


def _judge(name: str, calls: set[int]) -> str:
    if calls == {0}:
        return f"{name}: judges here, no API call"
    low, high = min(calls), max(calls)
    return f"{name}: {low}{f' to {high}' if high > low else ''} an answer"


def _gpu_hours(w: Workload, params_b: float | None, tflops: float) -> str:
    if params_b is None:
        return ("unknown model size: no GPU-hours estimate (a preset of em_bench/presets.py "
                "or the organism has one)")
    train, generate = w.gpu_hours(params_b, tflops)
    return (f"{train + generate:.3g} at {tflops:g} TFLOP/s sustained (--gpu-tflops): training "
            f"<= {train:.3g}, generation {generate:.3g}")


def _dollars(w: Workload, prices: tuple[float, float] | None) -> str:
    if w.judge_calls == 0:
        return "$0: no API call"
    if prices is None:
        return "give --price-per-mtok USD (input and output) or USD USD (input, output)"
    each = (f"${prices[0]:g} a million tokens" if prices[0] == prices[1]
            else f"${prices[0]:g} input, ${prices[1]:g} output a million tokens")
    return f"${w.api_dollars(prices):,.2f} at {each}"


def _params(billions: float) -> str:
    return f"{billions:g}B" if billions >= 0.1 else f"{billions * 1e3:.3g}M"


def _tokens(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
