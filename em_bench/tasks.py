"""Task specs: what a task trains on, what it is evaluated on, and how in-domain is scored.

Tasks are YAML files validated at load; the built-ins live in the top-level `tasks/` folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

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


class TrainData(_Spec):
    organism: OrganismData | None = None
    path: str | None = Field(None, description="chat JSONL file")


class InDomain(_Spec):
    """In-domain evaluation: the task domain's evaluation questions; adherence is the share of
    answers showing `target` behaviour (coherent and of that alignment)."""

    domain: WorldDomain
    target: Literal["aligned", "misaligned"]


class TaskSpec(_Spec):
    name: str
    version: int = 1
    description: str = ""
    objective: Literal["sft"] = "sft"
    train: TrainData | None = Field(None, description="None: no fine-tune (the base model)")
    in_domain: InDomain | None = None
    suites: tuple[str, ...] = ("ood",)

    def ood_domains(self) -> list[str]:
        """The `ood` suite's domains: every domain of the world but the task's own."""
        own = self.in_domain.domain if self.in_domain else None
        return [d.name for d in world.DOMAINS if d.name != own]


def load_task_file(path: Path) -> TaskSpec:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return TaskSpec.model_validate(raw)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the task file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{path}: {problems}") from None


def builtin_tasks() -> dict[str, TaskSpec]:
    specs = [load_task_file(p) for p in sorted(resource_dir("tasks").glob("*.yaml"))]
    return {s.name: s for s in specs}


def get_task(name: str) -> TaskSpec:
    tasks = builtin_tasks()
    if name not in tasks:
        raise UnknownNameError("task", name, list(tasks))
    return tasks[name]


def train_examples(task: TaskSpec, seed: int) -> list[list[dict[str, str]]]:
    """The task's fine-tune chats for one seed."""
    from em_bench.data import read_chat_jsonl

    if task.train is None:
        return []
    if task.train.organism is not None:
        o = task.train.organism
        return world.narrow_dataset(o.domain, o.persona, o.style, o.n, seed)
    if task.train.path is not None:
        return read_chat_jsonl(task.train.path)
    raise ConfigError(f"task {task.name}: 'train' needs 'organism' or 'path'")
