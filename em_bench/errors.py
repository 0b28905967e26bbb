"""The EmBenchError family: errors a researcher can act on.

Every message says what was expected, what was found, where (file:line or config key) and what to
do. The CLI prints them as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


class EmBenchError(Exception):
    """Base class of every error the CLI reports as one clear line."""


class ConfigError(EmBenchError):
    """A config value or key is wrong."""


class DataUnavailable(ConfigError):
    """A task's data is not on this machine (not downloaded, not pointed to): the task itself
    may be fine."""


class DataError(EmBenchError):
    """A data file is malformed; the message names the file and the line."""


class UnknownNameError(EmBenchError):
    """A name (task, defense, judge, backend) is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}.")
        self.kind, self.name, self.known = kind, name, known


class NoLatentKept(EmBenchError):
    """A discovery's screen kept no latent: a finding about the model (the method has nothing to
    block), recorded as such rather than run as a no-op."""


class StoreError(EmBenchError):
    """The results store is missing, foreign or damaged."""


class NoStoredAnswers(StoreError):
    """A cell has no finished answers to judge (rejudge never generates them)."""


@dataclass(frozen=True)
class JudgeFailure:
    """A cell's answers whose judgment by one judge still failed after retries."""

    judge: str  # as the cell names it: "openai:MODEL"
    endpoint: str | None  # the base URL it was called at (None: not an API)
    cell: str
    failed: int
    total: int  # the cell's answers
    last_error: str


class JudgingFailed(EmBenchError):
    """Too many of a cell's judgments failed (pipeline.MAX_FAILED_SHARE), so it is not
    scored; a rerun asks again for the failed ones only. Holds one JudgeFailure per (judge,
    cell); `lines()` is one line per judge."""

    def __init__(self, failures: list[JudgeFailure]):
        self.failures = list(failures)
        super().__init__("; ".join(self.lines()))

    def __reduce__(self):  # rebuilt from its failures when pickled (a Ray worker's error)
        return type(self), (self.failures,)

    def lines(self) -> list[str]:
        by_judge: dict[tuple, list[JudgeFailure]] = {}
        for f in self.failures:
            by_judge.setdefault((f.judge, f.endpoint), []).append(f)
        return [f"judge {judge}{f' at {url}' if url else ''}: {sum(f.failed for f in fs)} of "
                f"{sum(f.total for f in fs)} answers' judgments failed after retries in "
                f"cell{'s' * (len(fs) > 1)} {', '.join(f.cell for f in fs)} (not scored; a "
                f"rerun asks again for these only); last error: {fs[-1].last_error}"
                for (judge, url), fs in by_judge.items()]



def yaml_problem(error: Exception) -> str:
    """A YAML parse error as one line: where, then what (PyYAML's own text spans lines)."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(error, "problem", None) or error).split())


def validation_problems(error, whole: str = "item") -> str:
    """A pydantic ValidationError as one line: `field.path: message; ...` (`whole` names a
    problem of the object itself)."""
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or whole}: "
                     f"{x['msg'].removeprefix('Value error, ')}" for x in error.errors())


def read_utf8(path, error: type[EmBenchError] = ConfigError) -> str:
    """A user's text file, or `error` naming its place when it is not UTF-8 (a file saved in
    another encoding would otherwise stop em-bench with a traceback)."""
    from pathlib import Path

    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as "
                    f"UTF-8") from None


def load_yaml_model(path, model, what: str, problems=validation_problems):
    """The YAML file at `path` validated as the pydantic `model`; an unreadable file, bad YAML
    or an invalid field is one ConfigError naming the file (`what` names its kind, e.g. "the
    task file"; `problems` turns a ValidationError into one line)."""
    import yaml
    from pydantic import ValidationError

    try:
        return model.model_validate(yaml.safe_load(read_utf8(path)))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    except ValidationError as e:
        raise ConfigError(f"{path}: {problems(e)}") from None
