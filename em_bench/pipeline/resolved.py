"""A cell resolved: its config with every default filled in, what it depends on pinned by
content (data, question files, latent sets, the RAI suite), its id and its steps' input
hashes, and the provenance recorded with it."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from em_bench import threads
from em_bench.config import CellConfig, canonical_hash
from em_bench.defenses import check_defense, defense_inputs
from em_bench.defenses.base import DefenseContext
from em_bench.domains import is_rai
from em_bench.errors import UnknownNameError
from em_bench.judge import make_judge
from em_bench.models import is_organism, model_identity
from em_bench.questions import Prompt, file_prompts, load_question_file, world_prompts
from em_bench.registry import BACKENDS
from em_bench.tasks import TaskSpec, get_task

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
    in_domain_sha256: str | None = None  # a task's own in-domain questions, by content

    def payload(self) -> dict:
        return {"config": self.config.model_dump(mode="json"),
                "task_spec": self.task.model_dump(mode="json"),
                "model_identity": self.model_identity, "judge": self.judge,
                "train_data_sha256": self.train_data_sha256,
                "questions_sha256": self.questions_sha256,
                "defense_inputs": self.defense_inputs, "jury": list(self.jury),
                "rai_sha256": self.rai_sha256, **self._later()}

    def _later(self) -> dict:
        """Inputs added after cells were stored: in a hash only when set (older ids stay)."""
        return {} if self.in_domain_sha256 is None else {
            "in_domain_sha256": self.in_domain_sha256}

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
            parts.update(self._later())
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
    for file in (cfg.questions, cfg.in_domain_questions):
        if file is not None:
            load_question_file(file)  # a bad file fails here, before any work
    data = task.train.file() if task.train is not None else None
    inputs = defense_inputs(cfg.defense, params, DefenseContext.of(task, cfg))
    rai = None
    if cfg.rai_suite is not None:  # pinned by its requests, not by the suite file's wording
        requests = [(p.key, p.messages, p.domain, p.harmful) for p in rai_prompts(cfg)]
        rai = canonical_hash({"rai": requests}, length=64)
    return ResolvedCell(cfg, task, model_identity(cfg.model), judge.name,
                        _sha256(data), _sha256(cfg.questions), inputs, tuple(jury), rai,
                        _sha256(cfg.in_domain_questions))


def rai_prompts(cfg: CellConfig) -> list[Prompt]:
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


def eval_prompts(cfg: CellConfig) -> list[Prompt]:
    """What a cell answers. A real model's cell given a question file (its task names its own)
    answers what it is given and nothing of the organism's world: that file, its task's
    in-domain questions and its RAI suite (without them, no in-domain or refusal figure), so a
    small model on a CPU answers tens of questions, not hundreds. Any other cell answers the
    world's questions of its split (its RAI requests replaced by the suite's when it has one),
    its question file's and its task's in-domain questions."""
    prompts = []
    if cfg.questions is None or is_organism(cfg.model):
        prompts = world_prompts(cfg.split, cfg.sampling.samples_per_question)
        prompts = [p for p in prompts if cfg.rai_suite is None or not is_rai(p.domain)]
    if cfg.rai_suite is not None:
        prompts += rai_prompts(cfg)
    if cfg.questions is not None:
        prompts += file_prompts(load_question_file(cfg.questions))
    if cfg.in_domain_questions is not None:
        prompts += file_prompts(load_question_file(cfg.in_domain_questions), "in_domain",
                                "in_domain")
    return prompts

