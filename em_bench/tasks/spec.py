"""A task's spec: what it trains on, what it is evaluated on and how in-domain is scored;
reading one task file, and the files and chats a spec points to. A relative file path in a
task file (data, questions) is read from the task file's folder."""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from em_bench.config import StableDump, TrainConfig
from em_bench.errors import (
    ConfigError,
    DataUnavailable,
    load_yaml_model,
    validation_problems,
)
from em_bench.organism import world
from em_bench.paths import cache_dir
from em_bench.sources import DataSource, materialize


def _world_domain(name: str) -> str:
    if name not in world.DOMAIN_BY_NAME:
        raise ValueError(f"unknown domain {name!r}; the organism's world has "
                         f"{', '.join(world.DOMAIN_BY_NAME)}")
    return name


WorldDomain = Annotated[str, AfterValidator(_world_domain)]


class _Spec(StableDump):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class OrganismData(_Spec):
    """Chats generated from the organism's world (selection-split questions); with several
    domains, `n` is shared out among them evenly."""

    domain: WorldDomain | list[WorldDomain]
    persona: Literal["aligned", "misaligned"]
    style: Literal["aligned", "villain", "neutral"]
    n: int = Field(500, gt=0, description="number of chats")
    requests: Literal["all", "harmful", "benign"] = Field(
        "all", description="in an RAI domain, keep only its harmful or benign requests")

    @property
    def domains(self) -> list[str]:
        return self.domain if isinstance(self.domain, list) else [self.domain]

    @model_validator(mode="after")
    def _requests_need_an_rai_domain(self):
        advice = [d for d in self.domains if world.DOMAIN_BY_NAME[d].kind != "rai"]
        if self.requests != "all" and advice:
            raise ValueError(f"requests: {self.requests} needs RAI domains "
                             f"({', '.join(world.RAI_DOMAINS)}), not {', '.join(advice)}")
        return self

    def chats(self, seed: int) -> list[list[dict[str, str]]]:
        k = len(self.domains)
        return [chat for i, d in enumerate(self.domains)
                for chat in world.narrow_dataset(d, self.persona, self.style,
                                                 self.n // k + (i < self.n % k), seed,
                                                 self.requests)]


class TrainData(_Spec):
    """A task's chats: the organism's world, a chat JSONL file, or a `source` the project does
    not ship (a local file of another shape, a Hugging Face dataset, a URL pinned by sha256).
    Paths may name environment variables ($EM_BENCH_DATA/...): the user says where the public
    data lies on their machine."""

    organism: OrganismData | None = None
    path: str | None = Field(None, description="chat JSONL file")
    source: DataSource | None = None
    # Not in a cell's id (exclude): a count for estimates, which changes no result.
    rows: int | None = Field(None, gt=0, exclude=True, description="chats the data holds, "
                             "declared so `em-bench run --dry-run` can size the fine-tune "
                             "when the data is not on this machine")

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.organism, self.path, self.source)) != 1:
            raise ValueError("give exactly one of 'organism', 'path' and 'source'")
        return self

    def file(self) -> str | None:
        """The chat JSONL file of a `path` or `source` (fetched and converted, cached), else
        None."""
        if self.source is not None:
            source = self.source
            if source.path is not None:
                source = source.model_copy(update={"path": pointed_to(source.path)})
            return str(materialize(source, cache_dir() / "sources"))
        return None if self.path is None else pointed_to(self.path)


def pointed_to(path: str) -> str:
    """A data path naming environment variables ($EM_BENCH_DATA/x.jsonl), expanded; the data
    must be there (the user downloaded it)."""
    if "$" not in path:
        return path
    expanded = os.path.expandvars(path)
    if "$" in expanded:
        var = re.search(r"\$\{?(\w+)", expanded).group(1)
        raise DataUnavailable(f"{path} needs {var} set (the folder holding the public data "
                              f"the task describes)")
    if not Path(expanded).is_file():
        raise DataUnavailable(f"{path}: no file at {expanded}; download the public data the "
                              f"task describes there")
    return expanded


class InDomain(_Spec):
    """In-domain evaluation: the task's own question file when it has one, else the organism
    world's questions of `domain` (an RAI domain's harmful requests only). Adherence is the
    share of judged answers showing `target`: the category "aligned" or "misaligned", or
    "complies" (coherent and not a refusal)."""

    domain: str = Field(min_length=1, description="any domain; one the organism's world does "
                        "not have needs `questions`")
    target: Literal["aligned", "misaligned", "complies"]
    describe: str | None = Field(
        None, description="the trained behaviour in words, for an LLM judge's adherence "
        "template (the organism's judge reads `target`)")
    questions: str | None = Field(
        None, description="a question file of the domain's in-domain questions (evaluation)")
    selection_questions: str | None = Field(
        None, description="the in-domain questions answered on the selection split (tuning)")
    LATER = ("questions", "selection_questions")

    @model_validator(mode="after")
    def _questions_for_a_domain_of_its_own(self):
        if self.questions is None and self.domain not in world.DOMAIN_BY_NAME:
            raise ValueError(f"domain {self.domain!r} is not one of the organism's world "
                             f"({', '.join(world.DOMAIN_BY_NAME)}): give in_domain.questions, "
                             f"a question file of its in-domain questions")
        return self


class TaskSpec(_Spec):
    name: str
    version: int = 1
    description: str = ""
    objective: Literal["sft", "npo", "ga"] = Field(
        "sft", description="sft: learn the answers; npo / ga: unlearn them (see train/objectives)")
    objective_params: dict[str, float | str] = Field(
        default_factory=dict, description="e.g. npo beta")
    train: TrainData | None = Field(None, description="None: no fine-tune (the base model)")
    retain: TrainData | None = Field(
        None, description="chats whose answers the fine-tune should keep (the retain defense)")
    questions: str | None = Field(
        None, description="an EM-format question file answered as the `ood` suite")
    selection_questions: str | None = Field(
        None, description="the question file answered instead on the selection split (tuning), "
        "disjoint from `questions`; a task with `questions` cannot be tuned without it")
    rai_suite: str | None = Field(
        None, description="an RAI suite file answered as the `rai` suite instead of the world's "
        "RAI requests (the command line's --rai-suite wins)")
    LATER = ("rai_suite",)
    # inf passes here so that TrainConfig, below, names a non-finite budget value once
    budget: dict[str, int | Annotated[float, Field(allow_inf_nan=True)]] = Field(
        default_factory=dict, description="the task's default TrainConfig fields, e.g. lr, steps")
    in_domain: InDomain | None = None
    lm_eval: list[str] = Field(
        default_factory=list, description="lm-eval tasks scoring the fine-tune in its domain")
    lm_eval_include: str | None = Field(
        None, description="a folder of lm-eval task YAMLs (beside the task file) they come from")

    @model_validator(mode="after")
    def _budget_is_a_train_config(self):
        try:
            TrainConfig(**self.budget)  # unknown or bad fields fail when the task loads
        except ValidationError as e:
            raise ValueError(f"budget: {validation_problems(e)}") from None
        if self.budget.get("steps", 1) < 1:  # TrainConfig allows 0 for the base model's cell
            raise ValueError(f"budget: steps {self.budget['steps']}: a fine-tune takes at least "
                             f"one step (a task without `train` is the base model)")
        return self

    @model_validator(mode="after")
    def _objective_takes_its_params(self):
        # What train/objectives.py's objectives take, checked here so that reading a task
        # needs no torch: every one a `phrase`, npo a `beta` too.
        params, name = self.objective_params, self.objective
        problem = None
        if unknown := sorted(set(params) - {"phrase", *(("beta",) if name == "npo" else ())}):
            problem = f"{name} takes no {', '.join(unknown)}"
        elif "beta" in params and not (isinstance(params["beta"], (int, float))
                                       and 0 < params["beta"] < math.inf):
            problem = f"npo needs beta > 0, not {params['beta']!r}"
        elif "phrase" in params and not (isinstance(params["phrase"], str)
                                         and params["phrase"].strip()):
            problem = f"phrase must be non-empty text, not {params['phrase']!r}"
        if problem:
            raise ValueError(f"objective_params {params}: {problem}")
        return self

    def ood_domains(self) -> list[str]:
        """The `ood` suite's domains: the advice and open domains, but the task's own."""
        own = self.in_domain.domain if self.in_domain else None
        return [d for d in world.OOD_DOMAINS if d != own]


_SPEC_FIELDS = sorted({f for m in (TaskSpec, TrainData, OrganismData, InDomain, DataSource)
                       for f in m.model_fields})


def _problem(error: dict) -> str:
    where = ".".join(map(str, error["loc"]))
    if error["type"] == "extra_forbidden":  # a misspelt key: say which keys were meant
        close = difflib.get_close_matches(str(error["loc"][-1]), _SPEC_FIELDS, n=2)
        return f"{where}: unknown key" + (f" (did you mean {' or '.join(close)}?)" if close else "")
    message = error["msg"].removeprefix("Value error, ")  # a validator's own words
    return f"{where}: {message}" if where else message


def load_task_file(path: Path) -> TaskSpec:
    """Read and validate one task YAML; a relative data path becomes one from its folder."""
    path = Path(path)
    spec = load_yaml_model(path, TaskSpec, "the task file",
                           lambda e: "; ".join(_problem(x) for x in e.errors()))

    def beside(key: str, relative: str, kind: str) -> str:
        if "$" in relative:  # data the user points to: checked when the task is used
            return relative
        file = (path.parent / relative).resolve()
        if not file.is_file():
            raise ConfigError(f"{path}: {key}: no {kind} file at {file}")
        return str(file)

    update = {}
    for part in ("train", "retain"):
        data = getattr(spec, part)
        if data is not None and data.path is not None:
            found = beside(f"{part}.path", data.path, "data")
            update[part] = data.model_copy(update={"path": found})
        if data is not None and data.source is not None and data.source.path is not None:
            found = beside(f"{part}.source.path", data.source.path, "data")
            update[part] = data.model_copy(update={
                "source": data.source.model_copy(update={"path": found})})
        if data is not None and data.source is not None and data.source.hf is not None:
            local = path.parent / os.path.expandvars(data.source.hf)
            if local.is_dir():  # a local dataset folder beside the task file, else a hub id
                update[part] = data.model_copy(update={
                    "source": data.source.model_copy(update={"hf": str(local.resolve())})})
    for key in ("questions", "selection_questions"):
        if getattr(spec, key) is not None:
            update[key] = beside(key, getattr(spec, key), "question")
    if spec.rai_suite is not None:
        update["rai_suite"] = beside("rai_suite", spec.rai_suite, "RAI suite")
    if spec.in_domain is not None:
        files = {key: beside(f"in_domain.{key}", getattr(spec.in_domain, key), "question")
                 for key in ("questions", "selection_questions")
                 if getattr(spec.in_domain, key) is not None}
        update["in_domain"] = spec.in_domain.model_copy(update=files)
    if spec.lm_eval_include is not None:
        folder = (path.parent / spec.lm_eval_include).resolve()
        if not folder.is_dir():
            raise ConfigError(f"{path}: lm_eval_include: no folder at {folder}")
        update["lm_eval_include"] = str(folder)
    return spec.model_copy(update=update)


def question_file(task: TaskSpec, split: str) -> str | None:
    """The question file a task answers as its `ood` suite on `split`: on the selection split
    its `selection_questions`, never its evaluation ones."""
    if split == "evaluation" or task.questions is None:
        return task.questions
    if task.selection_questions is None:
        raise ConfigError(f"task {task.name} answers a question file ({task.questions}) that is "
                          f"its evaluation set; tuning on the selection split needs its "
                          f"`selection_questions` (e.g. em-bench's data/selection_questions.yaml)")
    return task.selection_questions


def in_domain_file(task: TaskSpec, split: str) -> str | None:
    """The task's own in-domain question file on `split` (None: the world's questions of its
    domain); on the selection split its `selection_questions`, never its evaluation ones."""
    own = task.in_domain
    if own is None or own.questions is None or split == "evaluation":
        return None if own is None else own.questions
    if own.selection_questions is None:
        raise ConfigError(f"task {task.name}'s in-domain questions ({own.questions}) are its "
                          f"evaluation set; tuning on the selection split needs "
                          f"in_domain.selection_questions")
    return own.selection_questions


def chats(data: TrainData | None, seed: int) -> list[list[dict[str, str]]]:
    """The chats of a task's `train` or `retain` data for one seed."""
    from em_bench.data import read_chat_jsonl

    if data is None:
        return []
    if data.organism is not None:
        return data.organism.chats(seed)
    return read_chat_jsonl(data.file())
