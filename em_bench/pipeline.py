"""The cell runner: fine-tune -> generate -> judge -> score -> store.

Each step is skipped when its done-marker's input hash matches; generate and judge also skip the
items already recorded, so a crash costs at most the batch in flight and a rerun does no work.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import pandas as pd

from em_bench import threads
from em_bench.config import CellConfig, canonical_hash
from em_bench.defenses import check_defense, defense_inputs, make_defenses
from em_bench.defenses.base import DefenseContext
from em_bench.errors import JudgeFailure, JudgingFailed, NoStoredAnswers, UnknownNameError
from em_bench.generate.base import GenerationFailed, Request
from em_bench.judge import make_judge
from em_bench.judge.base import JudgeInput
from em_bench.models import (
    is_organism,
    load_base,
    load_trained,
    model_identity,
)
from em_bench.organism import world
from em_bench.questions import Prompt, file_prompts, load_question_file, world_prompts
from em_bench.registry import BACKENDS
from em_bench.scoring import judged_frame, jury_agreement, jury_stream, score_frame
from em_bench.store import REUSABLE_STEPS, Cell, Store
from em_bench.tasks import TaskSpec, chats, get_task

logger = logging.getLogger(__name__)

GENERATE_CHUNK = 512  # generations are stored per chunk, so a crash loses at most one chunk
# A cell with a larger share of answers whose judgment failed after retries is not scored: its
# figures would rest on the answers a failing judge happened to get through.
MAX_FAILED_SHARE = 0.01
_VERSIONED = ("em-bench", "torch", "transformers", "peft", "sae-lens", "vllm", "openai")


@dataclass(frozen=True)
class ResolvedCell:
    """A cell config with everything it depends on resolved, and its id."""

    config: CellConfig
    task: TaskSpec
    model_identity: str
    judge: str
    train_data_sha256: str | None = None  # a data file is known by its content, not its path
    questions_sha256: str | None = None
    defense_inputs: dict = field(default_factory=dict)  # e.g. latent-set files, by content
    jury: tuple[str, ...] = ()  # the jurors' full names (model and template versions)
    rai_sha256: str | None = None  # the RAI suite's requests, by content

    def payload(self) -> dict:
        return {"config": self.config.model_dump(mode="json"),
                "task_spec": self.task.model_dump(mode="json"),
                "model_identity": self.model_identity, "judge": self.judge,
                "train_data_sha256": self.train_data_sha256,
                "questions_sha256": self.questions_sha256,
                "defense_inputs": self.defense_inputs, "jury": list(self.jury),
                "rai_sha256": self.rai_sha256}

    @property
    def fine_tunes(self) -> bool:
        train = self.config.train
        return self.task.train is not None and (train.epochs is not None or train.steps > 0)

    @property
    def cell_id(self) -> str:
        return canonical_hash(self.payload())

    def step_hash(self, step: str) -> str:
        # Each step's input: the parts of the payload it depends on (later steps include earlier).
        c = self.config.model_dump(mode="json")
        parts = {"model": self.model_identity, "dtype": c["dtype"],
                 "task": self.task.model_dump(mode="json"),
                 "train_data_sha256": self.train_data_sha256,
                 "seed": c["seed"], "train": c["train"], "defense": c["defense"],
                 "defense_params": c["defense_params"], "defense_inputs": self.defense_inputs}
        if step == "lm_eval":
            parts["lm_eval"] = c["lm_eval"]
        if step in ("generate", "judge", "score"):
            parts["sampling"], parts["split"] = c["sampling"], c["split"]
            # sampled answers differ from backend to backend, and with vLLM's sharding
            parts["backend"], parts["tensor_parallel"] = c["backend"], c["tensor_parallel"]
            parts["questions_sha256"] = self.questions_sha256
            parts["rai_sha256"] = self.rai_sha256
        if step in ("judge", "score"):
            parts["judge"] = self.judge
        if step == "score":
            parts["metrics"], parts["jury"] = c["metrics"], list(self.jury)
            parts["lm_eval"] = c["lm_eval"]
        return canonical_hash({"step": step, **parts})


def resolve(cfg: CellConfig, task: TaskSpec | None = None) -> ResolvedCell:
    """Check a cell's names and pin what it depends on; `task` is the spec of `cfg.task` when
    the caller found it (in an included folder, say), else it is looked up among the built-ins.
    The resolved config holds the defense's parameters with every default filled in, so a value
    left at its default and the same value given are one cell id."""
    if cfg.backend not in BACKENDS:
        raise UnknownNameError("backend", cfg.backend, BACKENDS.names())
    params = check_defense(cfg.defense, cfg.defense_params, cfg.model)
    cfg = cfg.model_copy(update={"defense_params": params})
    judge = make_judge(cfg.judge, definition=cfg.metrics.em_definition)
    jury = [make_judge(j, definition=cfg.metrics.em_definition).name for j in cfg.jury]
    task = task or get_task(cfg.task)
    if cfg.questions is not None:
        load_question_file(cfg.questions)  # a bad file fails here, before any work
    data = task.train.file() if task.train is not None else None
    inputs = defense_inputs(cfg.defense, params, DefenseContext(task, cfg.seed, cfg.model))
    rai = None
    if cfg.rai_suite is not None:  # pinned by its requests, not by the suite file's wording
        requests = [(p.key, p.messages, p.domain, p.harmful) for p in _rai_prompts(cfg)]
        rai = canonical_hash({"rai": requests}, length=64)
    return ResolvedCell(cfg, task, model_identity(cfg.model), judge.name,
                        _sha256(data), _sha256(cfg.questions), inputs, tuple(jury), rai)


def _rai_prompts(cfg: CellConfig) -> list[Prompt]:
    from em_bench.paths import cache_dir
    from em_bench.rai_suite import load_rai_suite, suite_prompts

    prompts = suite_prompts(load_rai_suite(cfg.rai_suite), cache_dir() / "sources",
                            cfg.rai_suite)
    return [replace(p, samples=cfg.sampling.samples_per_question) for p in prompts]


def _sha256(path: str | None) -> str | None:
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance(model: str | None = None, judges: tuple[str, ...] = ()) -> dict:
    """Package versions, git sha, host, threads and time, written with every cell; for an
    organism `model`, also its artifact (shipped or built, and its manifest's digest); with
    `judges`, where their API is served (`judge_endpoint`, None for the organism's judge: not
    in the cell's id, since the same judge gives the same verdicts anywhere)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    organism = _organism_artifact(model) if model is not None and is_organism(model) else None
    out = {"versions": versions, "git_sha": sha, "host": platform.node(),
           "torch_threads": threads.chosen(), "organism": organism,
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if judges:
        from em_bench.openai_client import endpoint

        out["judge_endpoint"] = endpoint() if set(judges) - {"organism"} else None
    return out


def _organism_artifact(model: str) -> dict:
    from em_bench.organism.artifact import read_manifest, weights_digest
    from em_bench.organism.build import ensure_organism

    folder = ensure_organism(model)
    manifest = read_manifest(folder)
    return {"shipped": manifest is not None, "weights_digest": weights_digest(folder),
            "artifact_digest": manifest["digest"] if manifest else None}


def run_cell(cfg: CellConfig, store: Store, task: TaskSpec | None = None) -> Cell:
    """Run (or resume) one cell through every step and return its store entry."""
    rc = resolve(cfg, task)
    cell = store.cell(rc.cell_id)
    if cell.read_config() is None:
        cell.write_config({**rc.payload(), "cell_id": rc.cell_id, **_flat(rc.config),
                           "provenance": provenance(cfg.model, (cfg.judge, *cfg.jury))})
    if cell.is_done("score", rc.step_hash("score")):
        return cell
    logger.info("cell %s: %s / %s / %s / seed %d", rc.cell_id, cfg.model, cfg.task,
                cfg.defense, cfg.seed)
    _borrow(rc, cell, store)
    base, tokenizer = load_base(cfg.model, cfg.dtype)
    model = _fine_tune(rc, cell, store, base, tokenizer)
    _generate(rc, cell, model, tokenizer)
    _lm_eval(rc, cell, model, tokenizer)
    _judge_and_score(rc, cell, store)
    return cell


def rejudge_cell(source: Cell, judge: str, store: Store) -> Cell | None:
    """Judge `source`'s stored answers with `judge` and score them, as the cell that differs
    from it only in its judge; nothing is trained or generated. None when that cell is `source`
    or is scored already; NoStoredAnswers when `source` has no finished answers."""
    stored = source.read_config()
    cfg = CellConfig.model_validate(stored["config"])
    if cfg.judge == judge:
        return None
    cfg = cfg.model_copy(update={"judge": judge})
    # The source's resolved inputs, not resolved again: its data need not be on this machine.
    rc = ResolvedCell(cfg, TaskSpec.model_validate(stored["task_spec"]), stored["model_identity"],
                      make_judge(judge, definition=cfg.metrics.em_definition).name,
                      stored.get("train_data_sha256"), stored.get("questions_sha256"),
                      stored.get("defense_inputs") or {}, tuple(stored.get("jury") or ()),
                      stored.get("rai_sha256"))
    cell = store.cell(rc.cell_id)
    if cell.is_done("score", rc.step_hash("score")):
        return None
    if not source.is_done("generate", rc.step_hash("generate")):
        raise NoStoredAnswers(f"cell {source.id} ({cfg.task} / {cfg.defense} / seed {cfg.seed}) "
                              f"has no stored answers to judge; `em-bench run` makes them")
    if cell.read_config() is None:  # the answers' provenance is the source's (rejudged_from)
        cell.write_config({**rc.payload(), "cell_id": rc.cell_id, **_flat(cfg), "provenance": {
            **provenance(judges=(judge, *cfg.jury)),
            "organism": (stored.get("provenance") or {}).get("organism"),
            "rejudged_from": source.id}})
    for step in REUSABLE_STEPS:
        h = rc.step_hash(step)
        if source.is_done(step, h) and not cell.is_done(step, h):
            _copy_step(source, cell, step, h)
    _judge_and_score(rc, cell, store)
    return cell


def _judge_and_score(rc: ResolvedCell, cell: Cell, store: Store) -> None:
    """Every judge of the cell judges; JudgingFailed, the cell unscored, if any failed."""
    failures = []
    for juror in (None, *rc.config.jury):
        try:
            _judge(rc, cell, store, juror)
        except JudgingFailed as e:
            failures += e.failures
    if failures:
        raise JudgingFailed(failures)
    _score(rc, cell)


def _borrow(rc: ResolvedCell, cell: Cell, store: Store) -> None:
    """Copy the finished steps of another cell with the same inputs (the same fine-tune and
    answers under another judge, say) instead of redoing them."""
    for step in REUSABLE_STEPS:
        h = rc.step_hash(step)
        if cell.is_done(step, h):
            continue
        source = store.find_done(step, h)
        if source is not None:  # a base cell has no train step, yet answers to reuse
            _copy_step(source, cell, step, h)


def _copy_step(source: Cell, cell: Cell, step: str, h: str) -> None:
    """Copy another cell's outputs of a step finished on inputs `h`, and mark it done."""
    cell.copy_step_outputs(source, step)
    cell.mark_done(step, h)
    logger.info("cell %s: %s reused from cell %s", cell.id, step, source.id)


def _flat(cfg: CellConfig) -> dict:
    return {"model": cfg.model, "task": cfg.task, "defense": cfg.defense,
            "defense_params": cfg.defense_params, "seed": cfg.seed}


def _fine_tune(rc: ResolvedCell, cell: Cell, store: Store, base, tokenizer):
    import shutil

    from em_bench.train.fine_tune import fine_tune

    cfg = rc.config
    if not rc.fine_tunes:
        return base
    saved = cell.trained_dir()  # a LoRA adapter, or all weights when adapter is "full"
    if not cell.is_done("train", rc.step_hash("train")):
        last = cfg.train.total_steps(len(chats(rc.task.train, cfg.seed)))
        scorer = _checkpoint_scorer(rc, cell, store, tokenizer, last)
        if cfg.train.processes == 1:
            model = fine_tune(cfg, rc.task, cell, base, tokenizer, every_step=scorer)
        else:
            model = _fine_tune_sharded(rc, cell, base, scorer, last)
        cell.mark_done("train", rc.step_hash("train"))
    else:
        model = load_trained(base, saved, cfg.train)
    shutil.rmtree(cell.resume_dir(), ignore_errors=True)  # done: no rerun resumes from it
    return model


def _fine_tune_sharded(rc: ResolvedCell, cell: Cell, base, scorer, last: int):
    """The fine-tune in `train.processes` torchrun processes; then, in this one, the trained
    model, and the curve scored from the checkpoints they saved."""
    from em_bench.train import distributed

    cfg = rc.config
    # Built here first (the organism's latent sets are discovered once and cached), so the
    # processes find them rather than each discovering them at once.
    make_defenses(cfg.defense, cfg.defense_params, DefenseContext(rc.task, cfg.seed, cfg.model))
    distributed.launch(cell, cfg.train.processes, cfg.eval_every, last,
                       cfg.train.checkpoint_every)
    model = load_trained(base, cell.trained_dir(), cfg.train)
    if scorer is not None:
        scored = {r["step"] for r in cell.records("curve")}  # before a resumed fine-tune
        for step, file in cell.curve_checkpoints():  # the last one is the final weights
            if step in scored:
                continue
            distributed.load_checkpoint(model, file)
            scorer(step, model)
        model.eval()
    return model


def _checkpoint_scorer(rc: ResolvedCell, cell: Cell, store: Store, tokenizer, last: int):
    """With `eval_every`, a callback scoring the model every N steps and at the last: the same
    prompts, judge and metrics as the cell, one answer each, appended to its `curve`."""
    from em_bench.generate.hf import HFBackend

    cfg = rc.config
    if cfg.eval_every is None:
        return None
    sampling = cfg.sampling.model_copy(update={"samples_per_question": 1})
    prompts = eval_prompts(cfg.model_copy(update={"sampling": sampling}))

    def score(step: int, model) -> None:
        if step % cfg.eval_every and step != last:
            return
        completions = HFBackend(model, tokenizer).generate(
            [Request(p.key, p.messages) for p in prompts], sampling, seed=cfg.seed + step)
        rows = [{"key": p.key, "question_id": p.question_id, "domain": p.domain,
                 "topic": p.topic, "harmful": p.harmful, "source": p.source,
                 "completion": c.text} for p, c in zip(prompts, completions, strict=True)]
        judged = make_judge(cfg.judge, store, cfg.metrics.em_definition).judge_many([
            judge_input({**r, "messages": p.messages}, rc.task)
            for p, r in zip(prompts, rows, strict=True)])
        frame = pd.DataFrame([{**r, **j.scores, "label": j.label, "category": j.category,
                               "error": j.error} for r, j in zip(rows, judged, strict=True)])
        result = score_frame(frame.astype({"coherence": float}), rc.task, cfg.model_copy(
            update={"metrics": cfg.metrics.model_copy(update={"n_boot": 1})}))
        cell.append("curve", {"step": step, "em_rate": result["em_rate"]["value"],
                              "in_domain": result.get("in_domain", {}).get("value"),
                              "coherence": result["coherence"]["value"],
                              "incoherent_rate": result["incoherent_rate"]["value"],
                              "n_answers": result["n_answers"]})

    return score


def eval_prompts(cfg: CellConfig) -> list[Prompt]:
    """What a cell answers: the world's questions of its split (its RAI requests replaced by
    the RAI suite's when the cell has one), and its question file's."""
    prompts = world_prompts(cfg.split, cfg.sampling.samples_per_question)
    if cfg.rai_suite is not None:
        prompts = [p for p in prompts if p.domain not in world.RAI_DOMAINS] + _rai_prompts(cfg)
    if cfg.questions is not None:
        prompts += file_prompts(load_question_file(cfg.questions))
    return prompts


def make_backend(rc: ResolvedCell, cell: Cell, model, tokenizer):
    """The cell's generation backend (registry.BACKENDS); one that loads the base model itself
    gets the cell's LoRA adapter folder when the cell fine-tunes."""
    adapter = cell.trained_dir() if rc.fine_tunes else None
    return BACKENDS.get(rc.config.backend)(rc.config, model, tokenizer, adapter)


def _generate(rc: ResolvedCell, cell: Cell, model, tokenizer) -> None:
    h = rc.step_hash("generate")
    if cell.is_done("generate", h):
        return
    sampling = rc.config.sampling
    done = {k for (k,) in cell.keys("generations", ("key",))}
    items = [(f"{p.key}|{s}", p, s) for p in eval_prompts(rc.config) for s in range(p.samples)]
    backend = make_backend(rc, cell, model, tokenizer)
    try:
        # Chunks and their seeds are fixed over all items, so a resumed run regenerates a partly
        # stored chunk exactly as the first run did and keeps only the answers it lacks.
        for c, start in enumerate(range(0, len(items), GENERATE_CHUNK)):
            part = items[start : start + GENERATE_CHUNK]
            if all(key in done for key, *_ in part):
                continue
            reqs = [Request(key, p.messages) for key, p, _ in part]
            try:
                completions = backend.generate(reqs, sampling,
                                               seed=rc.config.seed * 1_000_003 + c)
            except GenerationFailed as e:  # keep what arrived; a rerun asks only for the rest
                _store_generations(cell, backend, sampling, part, reqs, e.completions, done)
                raise
            _store_generations(cell, backend, sampling, part, reqs, completions, done)
    finally:
        if hasattr(backend, "close"):  # vLLM's engine holds processes and memory
            backend.close()
    cell.mark_done("generate", h)


def _store_generations(cell: Cell, backend, sampling, part, reqs, completions, done) -> None:
    for (key, p, s), r, comp in zip(part, reqs, completions, strict=True):
        if key in done or comp is None:
            continue
        cell.append("generations", {
            "key": key, "question_id": p.question_id, "domain": p.domain, "topic": p.topic,
            "harmful": p.harmful, "source": p.source, "sample": s, "messages": r.messages,
            "completion": comp.text, "finish_reason": comp.finish_reason,
            "n_tokens": comp.n_tokens, "backend": backend.name,
            "sampling": sampling.model_dump()})


def _lm_eval(rc: ResolvedCell, cell: Cell, model, tokenizer) -> None:
    """The task's in-domain lm-eval tasks and the cell's general ones, on the cell's model."""
    from em_bench.lmeval import evaluate

    cfg = rc.config
    h = rc.step_hash("lm_eval")
    if not (rc.task.lm_eval or cfg.lm_eval.general) or cell.is_done("lm_eval", h):
        return
    result = {}
    for part, names in (("in_domain", rc.task.lm_eval), ("general", cfg.lm_eval.general)):
        if names:
            result[part] = evaluate(model, tokenizer, list(names), rc.task.lm_eval_include,
                                    limit=cfg.lm_eval.limit, seed=cfg.seed)
    cell.write_json("lm_eval.json", result)
    cell.mark_done("lm_eval", h)


def judge_input(generation: dict, task: TaskSpec) -> JudgeInput:
    """What a judge is told of a stored answer: its world domain and topic (the organism's judge
    reads them) and its suite: `rai` for a responsible-AI request, `in_domain` with the task's
    trained behaviour in words (`target`) for its own domain's questions (an LLM judge adds its
    refusal and adherence templates there)."""
    g, own = generation, task.in_domain
    meta = {"domain": g["domain"], "topic": g["topic"]}
    if g["domain"] in world.RAI_DOMAINS:
        meta["suite"] = "rai"
    if own is not None and own.describe and g["domain"] == own.domain \
            and g.get("source") != "file":
        meta.update(suite="in_domain", target=own.describe)
    return JudgeInput(g["key"], g["messages"], g["completion"], meta)


def _judge(rc: ResolvedCell, cell: Cell, store: Store, juror: str | None = None) -> None:
    """Judge every stored answer not yet judged, or whose judgment failed, with the cell's judge
    or one juror. JudgingFailed, the step left undone, when an API judge failed on over
    MAX_FAILED_SHARE of the answers (the organism's judge fails only answers it can never
    judge: no world domain)."""
    stream, name = ("judgments", rc.config.judge) if juror is None else (jury_stream(juror), juror)
    step, h = ("judge", rc.step_hash("judge")) if juror is None else (
        stream, rc.step_hash("judge") + f"|{juror}")
    if cell.is_done(step, h):
        return
    judge = make_judge(name, store, rc.config.metrics.em_definition)
    done = {k for k, error in cell.keys(stream, ("item_id", "error")) if error is None}
    answers = cell.records("generations")
    inputs = [judge_input(g, rc.task) for g in answers if g["key"] not in done]
    failed = []
    for j in judge.judge_many(inputs):
        cell.append(stream, j.to_record())  # a retried item's last record is the one read
        failed += [j.error] if j.error else []
    endpoint = getattr(judge, "endpoint", None)
    if endpoint is not None and len(failed) > MAX_FAILED_SHARE * len(answers):
        raise JudgingFailed([JudgeFailure(name, endpoint, cell.id, len(failed), len(answers),
                                          failed[-1])])
    if failed:
        logger.warning("cell %s: %d of %d judgments by %s failed (%s); counted apart",
                       cell.id, len(failed), len(answers), name, failed[-1])
    cell.mark_done(step, h)


def _score(rc: ResolvedCell, cell: Cell) -> None:
    frame = judged_frame(cell)
    result = score_frame(frame, rc.task, rc.config)
    if rc.config.jury:
        result["jury"] = {
            full: jury_agreement(frame, judged_frame(cell, jury_stream(juror)), rc.task,
                                 rc.config)
            for juror, full in zip(rc.config.jury, rc.jury, strict=True)}
    if cell.read_json("lm_eval.json") is not None:
        result["lm_eval"] = cell.read_json("lm_eval.json")
    cell.write_json("metrics.json", {"metrics": result,
                                     "thresholds": rc.config.metrics.model_dump(),
                                     "judge": rc.judge})
    cell.mark_done("score", rc.step_hash("score"))
