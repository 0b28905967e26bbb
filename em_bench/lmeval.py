"""Score an in-memory (fine-tuned) model on lm-eval tasks: in-domain accuracy, general capability.

    scores = evaluate(model, tokenizer, ["em_bench_commonsense"], limit=20)
    # {"em_bench_commonsense": {"acc": 0.55, "acc_stderr": 0.11, "acc_norm": 0.5, ...}}

Tasks are looked up in em-bench's own `lm_eval_tasks/` folder, then in `include_path` (an
lm-eval task folder of YAMLs; it overrides names it shares), then among lm-eval's built-in tasks.

- The model: a transformers model, or a peft model whose adapter stays applied: peft injects the
  LoRA layers into the base model in place, so `get_base_model()` is a plain PreTrainedModel (what
  lm-eval's HFLM expects) that still runs the adapter (tests/test_lmeval.py proves it).
- Scores: {task: {metric: value}} with the numeric entries of lm-eval's results. A metric keeps
  lm-eval's name ("acc"), its standard error is "<metric>_stderr" (lm-eval's own name; dropped
  when lm-eval gives "N/A"); a filter other than "none" stays in the key ("exact_match,flexible").
- Local data: lm-eval passes `dataset_kwargs.data_files` to `datasets.load_dataset`, which
  resolves a relative path against the working directory, not the YAML's folder. Here a relative
  data_files of a task (not of a group's members) is made absolute against its YAML's folder.
- A built-in task whose data is on the Hugging Face Hub fails offline with a one-line DataError.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import random
from pathlib import Path
from typing import Any

from em_bench.errors import ConfigError, DataError, EmBenchError, UnknownNameError
from em_bench.resources import resource_dir

# lm-eval's stderr of a non-mean metric is a bootstrap; its default 100000 resamples is slow on
# CPU for no visible gain in a stored score.
BOOTSTRAP_ITERS = 1000
# Exceptions (by class name, anywhere in the cause chain) that mean "the hub is out of reach".
_HUB_ERRORS = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
               "ConnectError", "ConnectTimeout", "ConnectionError"}


class UnknownTaskError(UnknownNameError):
    """A task name that neither the include paths nor lm-eval's built-in tasks define."""

    def __init__(self, name: str, local: list[str], builtin: list[str]):
        close = difflib.get_close_matches(name, [*local, *builtin], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        EmBenchError.__init__(
            self, f"unknown lm-eval task {name!r}.{hint} Known in the include paths: "
            f"{', '.join(sorted(local)) or 'none'}; plus {len(builtin)} lm-eval built-ins "
            "(`lm-eval ls tasks`).")
        self.kind, self.name, self.known = "lm-eval task", name, local


def evaluate(model, tokenizer, tasks: list[str], include_path: str | Path | None = None,
             limit: int | None = None, batch_size: int = 8,
             seed: int = 0) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on `model` (adapter applied); {task: {metric: value}}."""
    return scores(run_lm_eval(model, tokenizer, tasks, include_path, limit, batch_size, seed))


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8, seed: int = 0,
                log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's whole results dict (with per-item "samples" if `log_samples`)."""
    if not tasks:
        raise ConfigError("lm-eval: no tasks given; name at least one lm-eval task.")
    with _quiet_lm_eval(), _kept_rng_state(), _kept_train_mode(model):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        manager = _task_manager(tasks, _include_paths(include_path))
        loaded = [task for name in tasks for task in _load_task(manager, name)]
        lm = HFLM(pretrained=_transformers_model(model), tokenizer=tokenizer,
                  batch_size=batch_size)
        return simple_evaluate(
            lm, tasks=loaded, task_manager=manager, limit=limit, log_samples=log_samples,
            bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The numeric metrics of lm-eval's results, keyed without the default ",none" filter."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results["results"].items():
        out[task] = {}
        for key, value in row.items():
            metric, comma, where = key.partition(",")
            if not comma or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", "sample_len" (no filter part), "N/A" stderr
            out[task][metric if where == "none" else key] = float(value)
    return out


def _transformers_model(model):
    """The PreTrainedModel HFLM wants; a peft model's base still carries the adapter layers."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _include_paths(include_path: str | Path | None) -> list[Path]:
    paths = [resource_dir("lm_eval_tasks")]
    if include_path is not None:
        path = Path(include_path).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"lm-eval include_path {str(include_path)!r} is not a folder; "
                              "give a folder of lm-eval task YAMLs.")
        paths.append(path)
    return list(dict.fromkeys(p.resolve() for p in paths))


def _task_manager(names: list[str], paths: list[Path]):
    """A TaskManager that knows `names`; indexing lm-eval's ~15k built-ins takes seconds, so
    only when a name is not a task of the include paths."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=paths, include_defaults=False)
    if all(name in local.all_subtasks for name in names):
        return local
    full = TaskManager(include_path=paths)
    for name in names:
        if name not in full.task_index:
            builtin = sorted(set(full.all_tasks) - set(local.all_tasks))
            raise UnknownTaskError(name, local.all_tasks, builtin)
    return full


def _load_task(manager, name: str) -> list:
    """lm-eval's Task (or Group, or a tag's tasks) for `name`, its data loaded."""
    entry = manager.task_index[name]
    try:
        loaded = manager.load([_spec(entry)])
    except Exception as error:
        problem = _data_problem(name, entry.cfg or {}, error)
        if problem is None:
            raise
        raise problem from error
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def _spec(entry) -> str | dict[str, Any]:
    """The task's name, or its full config with relative data_files made absolute."""
    cfg = entry.cfg or {}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if "task" not in cfg or isinstance(cfg["task"], list) or files is None or not entry.yaml_path:
        return entry.name  # a group, tag or task without local files: nothing to resolve
    absolute = _absolute(files, Path(entry.yaml_path).parent)
    if absolute == files:
        return entry.name
    from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval reads a task YAML with

    full = load_yaml(entry.yaml_path)  # resolves `!function` tags and `include:` as lm-eval does
    full["dataset_kwargs"] = {**full.get("dataset_kwargs", {}), "data_files": absolute}
    return full


def _absolute(files, folder: Path):
    """data_files (a path, a list, or a {split: path or list}) with relative paths under folder."""
    if isinstance(files, dict):
        return {split: _absolute(value, folder) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute(value, folder) for value in files]
    if "://" in files or Path(files).expanduser().is_absolute():
        return files
    return str(folder / files)


def _data_problem(name: str, cfg: dict[str, Any], error: Exception) -> EmBenchError | None:
    """A one-line DataError when `error` means the task's data is out of reach, else None."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, ConnectionError) or type(e).__name__ in _HUB_ERRORS for e in chain):
        return DataError(
            f"lm-eval task {name!r}: its data ({cfg.get('dataset_path')!r}) is on the Hugging "
            "Face Hub and cannot be downloaded here (offline, and not in the local datasets "
            "cache); run it where the hub is reachable, or ship the data with a local task YAML.")
    missing = next((e for e in chain if isinstance(e, FileNotFoundError)), None)
    if missing is not None:
        return DataError(f"lm-eval task {name!r}: data file not found: "
                         f"{' '.join(str(missing).split())}.")
    return None


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs setup chatter and warnings (e.g. "pretrained is not a str") at each run."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _kept_rng_state():
    """simple_evaluate seeds the global RNGs; a caller mid-run keeps its own random stream."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


@contextlib.contextmanager
def _kept_train_mode(model):
    """HFLM puts the model in eval mode; a model evaluated mid-training goes back to training."""
    training = getattr(model, "training", False)
    try:
        yield
    finally:
        if training:
            model.train()
