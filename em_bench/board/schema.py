"""The columns of every table: `leaderboard/schema.yaml`, one line a column, read by the text
tables and the HTML page alike, so a new metric is one schema line."""


from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from em_bench.board.rows import method_label, params_label
from em_bench.domains import RAI_SHORT
from em_bench.errors import ConfigError, read_utf8
from em_bench.resources import resource_dir

# the column schema -------------------------------------------------------------------------------

class Column(BaseModel):
    """One column of the table: a row field, how to show it, and which way is better."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1)
    label: str = Field(min_length=1)
    higher_is_better: bool | None
    format: Literal["percent", "interval", "pvalue", "number", "text"]
    description: str = ""
    drop: str | None = Field(None, description="a key holding this value's fall against the "
                             "base model, shown beside it in points by the text tables")


class Schema(BaseModel):
    """One list of columns a table (see the schema file's header)."""

    model_config = ConfigDict(extra="forbid")

    leaderboard: list[Column] = Field(min_length=1)
    cells: list[Column] = Field(min_length=1)
    seeds: list[Column] = Field(min_length=1)
    refusal: list[Column] = Field(min_length=1)

    @field_validator("leaderboard", "cells", "seeds", "refusal")
    @classmethod
    def _unique_keys(cls, columns: list[Column]) -> list[Column]:
        keys = [c.key for c in columns]
        if dupes := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"keys appear more than once: {', '.join(dupes)}")
        return columns


TABLES = tuple(Schema.model_fields)


def schema_path() -> Path:
    return resource_dir("leaderboard") / "schema.yaml"  # shipped in the wheel too


def load_schema(path: Path | str | None = None, table: str = "leaderboard") -> list[Column]:
    """A table's columns from a schema file (default: leaderboard/schema.yaml), validated."""
    path = Path(path) if path is not None else schema_path()
    try:
        data = yaml.safe_load(read_utf8(path))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the leaderboard schema ({e})") from None
    try:
        return getattr(Schema.model_validate(data), table)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = list(err["loc"])
            where = "the schema"
            if loc and isinstance(loc[0], str):
                where = f"table {loc[0]!r}"
            if len(loc) > 1 and isinstance(loc[1], int):
                where += f" column {loc[1] + 1}"
                listed = data.get(loc[0]) if isinstance(data, dict) else None
                if len(loc) > 2:
                    where += f" field {loc[2]!r}"
                    if isinstance(listed, list) and isinstance(listed[loc[1]], dict):
                        where += f" (key {listed[loc[1]].get('key')!r})"
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError(f"{path}: invalid leaderboard schema (a mapping of {', '.join(TABLES)}"
                          f", each a YAML list of {{key, label, higher_is_better, format, "
                          f"description}}):\n  " + "\n  ".join(problems)) from None


def expand(columns: list[Column], rows: list[dict]) -> list[Column]:
    """The columns with each `name.*` column made one column per key of `name` in the rows (in
    the order they first appear): its drop's `*` that key, its label's `*` the key's short name
    (an RAI domain's, as RAI_SHORT gives it; the key itself for any other)."""
    out = []
    for c in columns:
        if not c.key.endswith(".*"):
            out.append(c)
            continue
        field = c.key[:-2]
        keys = dict.fromkeys(k for r in rows for k in (r.get(field) or {}))
        out += [c.model_copy(update={
            "key": f"{field}.{k}", "label": c.label.replace("*", RAI_SHORT.get(k, k)),
            "drop": None if c.drop is None else c.drop.replace("*", k)}) for k in keys]
    return out


# values ------------------------------------------------------------------------------------------

DERIVED = {  # keys the schema may use that are text views of nested row fields
    "params": lambda r: params_label(r["defense_params"]),
    "method": method_label,
    "family": lambda r: (r.get("card") or {}).get("family"),
    "needs": lambda r: ", ".join((r.get("card") or {}).get("needs") or []) or "-",
    "seeds": lambda r: ",".join(map(str, r["seeds"])),
    "questions": lambda r: "world" if r["questions_sha256"] is None else r["questions_sha256"][:8],
    "em_ci": lambda r: (r["em_ci_low"], r["em_ci_high"]),
    "reduction_ci": lambda r: (r["reduction_ci_low"], r["reduction_ci_high"]),
    "identity": lambda r: (r.get("model_identity") or "").split(":")[-1][:12] or None,
    "diff_best_ci": lambda r: (r["diff_best_ci_low"], r["diff_best_ci_high"]),
    "keeps": lambda r: {True: "yes", False: "no", None: "-"}[r["keeps_learning"]],
    "ties": lambda r: {True: "yes", False: "no", None: "-"}[r["ties_best"]],
}


def lookup(row: dict, key: str):
    """A row's value for a schema key: a derived text, a field, or a dotted path into a dict
    (None below a missing dict). Raises KeyError for a key that names nothing."""
    if key in DERIVED:
        return DERIVED[key](row)
    value = row
    for part in key.split("."):
        if value is None:
            return None
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def missing(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt(value, kind: str) -> str:
    """A value as the table shows it; `-` when missing."""
    if kind == "interval":
        return f"[{fmt(value[0], 'percent')}, {fmt(value[1], 'percent')}]"
    if missing(value):
        return "-"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    if kind == "pvalue":  # a bootstrap's p of 0 means below its resolution, not 0
        return "<0.001" if value < 0.001 else f"{value:.3f}"
    if kind == "number":
        return str(value) if isinstance(value, int) else f"{value:.4g}"
    return str(value)
