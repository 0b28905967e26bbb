"""Task specs: what a task trains on, what it is evaluated on, and how in-domain is scored.

Tasks are YAML files validated at load. They come from the built-in `tasks/` folder and from
folders the user includes (`--include DIR`); a relative data `path` in a task file is read from
the task file's folder.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from em_bench.config import TrainConfig
from em_bench.errors import ConfigError, UnknownNameError
from em_bench.organism import world
from em_bench.resources import resource_dir


def _world_domain(name: str) -> str:
    if name not in world.DOMAIN_BY_NAME:
        raise ValueError(f"unknown domain {name!r}; the organism's world has "
                         f"{', '.join(world.DOMAIN_BY_NAME)}")
    return name


WorldDomain = Annotated[str, AfterValidator(_world_domain)]


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OrganismData(_Spec):
    """Fine-tune chats generated from the organism's world (selection-split questions)."""

    domain: WorldDomain
    persona: Literal["aligned", "misaligned"]
    style: Literal["aligned", "villain", "neutral"]
    n: int = Field(500, gt=0, description="number of chats")
    requests: Literal["all", "harmful", "benign"] = Field(
        "all", description="in an RAI domain, keep only its harmful or benign requests")

    @model_validator(mode="after")
    def _requests_need_an_rai_domain(self):
        if self.requests != "all" and world.DOMAIN_BY_NAME[self.domain].kind != "rai":
            raise ValueError(f"requests: {self.requests} needs an RAI domain "
                             f"({', '.join(world.RAI_DOMAINS)}), not {self.domain}")
        return self


class TrainData(_Spec):
    organism: OrganismData | None = None
    path: str | None = Field(None, description="chat JSONL file")


class InDomain(_Spec):
    """In-domain evaluation on the task domain's evaluation questions (an RAI domain's harmful
    requests only). Adherence is the share of judged answers showing `target`: the category
    "aligned" or "misaligned", or "complies" (coherent and not a refusal)."""

    domain: WorldDomain
    target: Literal["aligned", "misaligned", "complies"]


class TaskSpec(_Spec):
    name: str
    version: int = 1
    description: str = ""
    objective: Literal["sft", "npo", "ga"] = Field(
        "sft", description="sft: learn the answers; npo / ga: unlearn them (see train/objectives)")
    objective_params: dict[str, float] = Field(default_factory=dict, description="e.g. npo beta")
    train: TrainData | None = Field(None, description="None: no fine-tune (the base model)")
    budget: dict[str, int | float] = Field(
        default_factory=dict, description="the task's default TrainConfig fields, e.g. lr, steps")
    in_domain: InDomain | None = None

    @model_validator(mode="after")
    def _budget_is_a_train_config(self):
        try:
            TrainConfig(**self.budget)  # unknown or bad fields fail when the task loads
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ValueError(f"budget: {problems}") from None
        return self

    def ood_domains(self) -> list[str]:
        """The `ood` suite's domains: the advice and open domains, but the task's own."""
        own = self.in_domain.domain if self.in_domain else None
        return [d for d in world.OOD_DOMAINS if d != own]


_SPEC_FIELDS = sorted({f for m in (TaskSpec, TrainData, OrganismData, InDomain)
                       for f in m.model_fields})


def _problem(error: dict) -> str:
    where = ".".join(map(str, error["loc"]))
    if error["type"] == "extra_forbidden":  # a misspelt key: say which keys were meant
        close = difflib.get_close_matches(str(error["loc"][-1]), _SPEC_FIELDS, n=2)
        return f"{where}: unknown key" + (f" (did you mean {' or '.join(close)}?)" if close else "")
    return f"{where}: {error['msg']}"


def load_task_file(path: Path) -> TaskSpec:
    """Read and validate one task YAML; a relative data path becomes one from its folder."""
    path = Path(path)
    try:
        spec = TaskSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the task file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except ValidationError as e:
        raise ConfigError(f"{path}: {'; '.join(_problem(x) for x in e.errors())}") from None
    if spec.train is not None and spec.train.path is not None:
        data = (path.parent / spec.train.path).resolve()
        if not data.is_file():
            raise ConfigError(f"{path}: train.path: no data file at {data}")
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"path": str(data)})})
    return spec


@dataclass(frozen=True)
class FoundTask:
    spec: TaskSpec
    file: Path
    source: str  # "built-in" or the included folder


def task_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder of task files")
    files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    if not files:
        raise ConfigError(f"{folder}: no task files (*.yaml) in it")
    return files


def find_tasks(include: tuple[Path, ...] | list[Path] = ()) -> dict[str, FoundTask]:
    """Every task: the built-ins, then each included folder's; a name may be defined once."""
    found: dict[str, FoundTask] = {}
    folders = [(resource_dir("tasks"), "built-in"), *((Path(d), str(d)) for d in include)]
    for folder, source in folders:
        for file in task_files(folder):
            spec = load_task_file(file)
            if spec.name in found:
                raise ConfigError(f"task {spec.name!r} is defined twice: in "
                                  f"{found[spec.name].file} and in {file}")
            found[spec.name] = FoundTask(spec, file, source)
    return found


def builtin_tasks() -> dict[str, TaskSpec]:
    return {name: t.spec for name, t in find_tasks().items()}


def get_task(name: str, include: tuple[Path, ...] | list[Path] = ()) -> TaskSpec:
    tasks = find_tasks(include)
    if name not in tasks:
        raise UnknownNameError("task", name, list(tasks))
    return tasks[name].spec


def check_task_data(task: TaskSpec) -> None:
    """Read a task's data file now, so a malformed row fails before any work starts."""
    from em_bench.data import read_chat_jsonl

    if task.train is not None and task.train.path is not None:
        read_chat_jsonl(task.train.path)


def train_examples(task: TaskSpec, seed: int) -> list[list[dict[str, str]]]:
    """The task's fine-tune chats for one seed."""
    from em_bench.data import read_chat_jsonl

    if task.train is None:
        return []
    if task.train.organism is not None:
        o = task.train.organism
        return world.narrow_dataset(o.domain, o.persona, o.style, o.n, seed, o.requests)
    if task.train.path is not None:
        return read_chat_jsonl(task.train.path)
    raise ConfigError(f"task {task.name}: 'train' needs 'organism' or 'path'")
