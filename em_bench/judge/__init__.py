"""Judges: each scores stored answers (judge/base.py); registry.JUDGES names them (`organism`,
`openai`, and whatever plugins add through the `em_bench.judges` entry-point group)."""

from __future__ import annotations

from em_bench.registry import JUDGES


def make_judge(name: str, store=None, definition: str = "alignment"):
    """The judge a cell names: `kind` or `kind:model` (openai:gpt-4o), its kind a registered
    judge's name; `store` holds the verdict cache of a judge that keeps one."""
    kind, _, model = name.partition(":")
    return JUDGES.get(kind)(model or None, store, definition)
