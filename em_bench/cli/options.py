"""The options several `em-bench` commands share, and the checks argparse cannot make.

An option several commands take (--store, --model, --dtype, --include, --format, the judge's)
is added by one function here, so it means the same everywhere.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from em_bench.errors import ConfigError


def csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def seed_list(text: str) -> list[int]:
    try:
        return [int(x) for x in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes integers like 0,1,2, not {text!r}") from None


def setting(text: str) -> tuple[str, list]:
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not csv_list(values):
        raise argparse.ArgumentTypeError(f"--set takes NAME=V1,V2,..., not {text!r}")
    return name.strip(), csv_list(values)


# Counts argparse takes as any integer; below 1 each would silently mean something else.
_COUNTS = ("samples", "steps", "grad_accum", "processes", "tensor_parallel", "lm_eval_limit",
           "eval_every", "slurm_time_minutes", "n", "k")


def refuse_nonsense(args) -> None:
    """Options that parse but no command can mean (0 samples, a 0-step fine-tune, a seed
    twice) are refused before any work, never replaced by a default."""
    for name in _COUNTS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected at least 1")
    seeds = getattr(args, "seeds", [])
    if len(set(seeds)) < len(seeds):
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        raise ConfigError(f"--seeds repeats {', '.join(map(str, twice))}: each seed is one cell, "
                          f"so a repeat would be counted twice")
    deadline = getattr(args, "judge_deadline", None)
    if deadline is not None and not deadline > 0:
        raise ConfigError(f"--judge-deadline {deadline:g}: expected seconds above 0")


class Help(argparse.HelpFormatter):
    """--help names each option's default, but not the empty ones (None, False, []), also for
    an option without help text."""

    def _get_help_string(self, action):
        d, text = action.default, action.help or ""
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in text:
            return action.help
        shown = ",".join(map(str, d)) if isinstance(d, list) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()

    def _format_action(self, action):
        if not action.help and self._get_help_string(action):  # else argparse prints none
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose subcommands' parsers (its own class) all use Help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)


def store(p) -> None:
    p.add_argument("--store", help="results folder (default: EM_BENCH_STORE or ./em-bench-results)")


def model(p, help: str | None = None) -> None:
    p.add_argument("--model", default="organism", help=help)


def dtype(p) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: float32, a preset's bfloat16)")


def include(p, help: str | None = None) -> None:
    p.add_argument("--include", type=Path, action="append", default=[], metavar="DIR", help=help)


def formats(p, *choices: str) -> None:
    """--format, the first of `choices` by default."""
    p.add_argument("--format", choices=list(choices), default=choices[0])


def judge(p, default: str | None, *, judge: str | None = None, model: str, base_url: str,
           deadline: str | None = None) -> None:
    """--judge, --judge-model, --judge-base-url and (with its help text) --judge-deadline; the
    commands word their help differently, as each uses the judge differently."""
    from em_bench.registry import JUDGES

    p.add_argument("--judge", default=default, choices=JUDGES.names(), help=judge)
    p.add_argument("--judge-model", help=model)
    p.add_argument("--judge-base-url", help=base_url)
    if deadline is not None:
        p.add_argument("--judge-deadline", type=float, metavar="S", help=deadline)
