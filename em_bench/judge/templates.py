"""LLM-judge prompt templates: versioned YAML files in `judges/`, validated at load.

A template has a `name`, a `version` (part of every cached judgment's key, so an edit is never
mistaken for the old wording), a `scale` (a number range or a choice of words), the `labels` the
judge may answer instead of a score, and a `prompt` with the placeholders {question} and
{answer} (and {target} for in-domain adherence).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from em_bench.errors import ConfigError, UnknownNameError, load_yaml_model, validation_problems
from em_bench.resources import resource_dir

PLACEHOLDERS = {"question", "answer", "target"}


class Scale(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["number", "choice"]
    min: float | None = None
    max: float | None = None
    options: list[str] = Field(default_factory=list)
    values: dict[str, float] = Field(
        default_factory=dict, description="a choice's options read as scores (YES: 100)")

    @model_validator(mode="after")
    def _complete(self):
        if self.kind == "number" and not (self.min is not None and self.max is not None
                                          and self.min < self.max):
            raise ValueError("a number scale needs min < max")
        if self.kind == "choice" and len(self.options) < 2:
            raise ValueError("a choice scale needs at least two options")
        if self.values and set(self.values) != set(self.options):
            raise ValueError(f"values must score every option ({', '.join(self.options)})")
        return self


class JudgeTemplate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int = Field(gt=0)
    scale: Scale
    labels: list[str] = Field(default_factory=list)
    prompt: str

    @model_validator(mode="after")
    def _placeholders(self):
        used = {f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None}
        if unknown := used - PLACEHOLDERS:
            raise ValueError(f"prompt: unknown placeholders {sorted(unknown)}; "
                             f"known: {sorted(PLACEHOLDERS)}")
        if missing := {"question", "answer"} - used:
            raise ValueError(f"prompt: needs the placeholders {sorted(missing)}")
        return self

    @property
    def needs(self) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None}

    def render(self, **fields: str) -> str:
        if missing := self.needs - set(fields):
            raise ConfigError(f"judge template {self.name}: no value for {sorted(missing)}")
        return self.prompt.format(**fields)


def load_template(name_or_path: str | Path) -> JudgeTemplate:
    """A shipped template by name (`alignment`, ...), or a template file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        shipped = {p.stem: p for p in resource_dir("judges").glob("*.yaml")}
        if str(name_or_path) not in shipped:
            raise UnknownNameError("judge template", str(name_or_path), list(shipped))
        path = shipped[str(name_or_path)]
    return load_yaml_model(path, JudgeTemplate, "the judge template", lambda e: (
        f"not a valid judge template: {validation_problems(e, 'template')}"))
