"""RAI refusal suites built from public refusal benchmarks: each benchmark's categories mapped
onto the seven responsible-AI domains, so a real model's refusal is read per domain as the
organism's is.

A suite file (YAML) lists benchmarks; each names where its public data lives (a DataSource:
the project ships none), the field holding the request and the one holding its category, which
domain each category counts for (categories not listed are left out, and counted), and whether
its requests are harmful (refusal) or benign (over-refusal): for all rows, or per row by a
label field. Paths are read beside the suite file and may name environment variables.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from em_bench.domains import RAI_DOMAINS
from em_bench.errors import DataError, DataUnavailable, load_yaml_model
from em_bench.questions import Prompt
from em_bench.sources import DataSource, read_rows

SUITE_SOURCE = "rai"  # the `source` of a suite's prompts (world prompts are "world")


def _rai_domain(name: str) -> str:
    if name not in RAI_DOMAINS:
        raise ValueError(f"{name!r} is not an RAI domain ({', '.join(RAI_DOMAINS)})")
    return name


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Benchmark(_Spec):
    name: str = Field(pattern=r"^[\w.-]+$")
    source: DataSource
    request_field: str = Field(description="the field holding the request")
    category_field: str
    domains: dict[str, Annotated[str, AfterValidator(_rai_domain)]] = Field(
        min_length=1, description="category -> the RAI domain it counts for")
    harmful: bool | None = Field(None, description="every row a harmful (or a benign) request")
    label_field: str | None = Field(None, description="else the row's label says which...")
    harmful_labels: list[str] = Field(default_factory=list, description="...these are harmful")

    @model_validator(mode="after")
    def _one_harm_rule(self):
        if (self.harmful is None) == (self.label_field is None):
            raise ValueError("give exactly one of 'harmful' and 'label_field'")
        if self.label_field is not None and not self.harmful_labels:
            raise ValueError("label_field needs harmful_labels")
        return self


class RaiSuite(_Spec):
    name: str
    version: int = 1
    description: str = ""
    benchmarks: list[Benchmark] = Field(min_length=1)


def load_rai_suite(path: str | Path) -> RaiSuite:
    """Read and validate a suite file; its data paths become absolute (beside the file)."""
    path = Path(path)
    suite = load_yaml_model(path, RaiSuite, "the RAI suite")
    benchmarks = []
    for b in suite.benchmarks:
        if b.source.path is not None:
            local = os.path.expandvars(b.source.path)
            local = local if "$" in local else str((path.parent / local).resolve())
            b = b.model_copy(update={"source": b.source.model_copy(update={"path": local})})
        benchmarks.append(b)
    return suite.model_copy(update={"benchmarks": benchmarks})


def suite_prompts(suite: RaiSuite, cache_dir: Path, where: str = "") -> list[Prompt]:
    """One prompt per row of every benchmark whose category the suite maps, in the domain that
    category counts for (its `topic` is the category)."""
    prompts = []
    for b in suite.benchmarks:
        named = b.source.path or ""
        if "$" in named:
            raise DataUnavailable(f"{where or suite.name}: benchmark {b.name}: {named} needs its "
                                  f"environment variable set (the folder holding its data)")
        before = len(prompts)
        for n, (here, row) in enumerate(read_rows(b.source, cache_dir, where)):
            for needed in (b.request_field, b.category_field, b.label_field):
                if needed is not None and needed not in row:
                    raise DataError(f"{here}: no {needed!r} field (the row has "
                                    f"{', '.join(map(str, row))})")
            category = str(row[b.category_field])
            if category not in b.domains:  # a category the suite leaves out
                continue
            request = row[b.request_field]
            if not isinstance(request, str) or not request.strip():
                raise DataError(f"{here}: the request ({b.request_field}) is empty")
            harmful = b.harmful if b.harmful is not None else \
                str(row[b.label_field]) in b.harmful_labels
            key = f"{SUITE_SOURCE}/{b.name}/{n}"
            prompts.append(Prompt(key, key, [{"role": "user", "content": request}], 1,
                                  b.domains[category], category, harmful, SUITE_SOURCE,
                                  {"benchmark": b.name}))
        if len(prompts) == before:
            raise DataError(f"{where or suite.name}: benchmark {b.name}: no row's "
                            f"{b.category_field} is one of {', '.join(b.domains)}")
    return prompts
