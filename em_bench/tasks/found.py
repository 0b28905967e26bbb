"""Finding tasks: the built-in `tasks/` folder, installed packages' entry points in the group
`em_bench.tasks` (registry.TASKS: each names a folder of task files, or a function returning
one) and folders the user includes (`--include DIR`); checking a task's files before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from em_bench.errors import (
    ConfigError,
    DataUnavailable,
    EmBenchError,
    UnknownNameError,
)
from em_bench.registry import TASKS, disabled
from em_bench.resources import resource_dir
from em_bench.tasks.spec import TaskSpec, load_task_file, pointed_to


@dataclass(frozen=True)
class FoundTask:
    spec: TaskSpec
    file: Path
    source: str  # "built-in" or the included folder


def _is_question_file(path: Path) -> bool:
    # A task file is a mapping; a question file (a plugin's own `questions`) is a list.
    try:
        return isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), list)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # load_task_file names the problem


def task_files(folder: Path) -> list[Path]:
    """The task files of a folder: its YAML files but the question files beside them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder of task files")
    files = [f for f in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
             if not _is_question_file(f)]
    if not files:
        raise ConfigError(f"{folder}: no task files (*.yaml) in it")
    return files


def plugin_folders() -> list[tuple[Path, str]]:
    """(folder, source) of every installed `em_bench.tasks` entry point (registry.TASKS) that
    loads; one that does not is disabled with a warning naming it, and only it."""
    folders = []
    for name, target in TASKS.loaded().items():
        source = TASKS.source(name)
        try:
            folders.append((Path(target() if callable(target) else target), source))
        except Exception as e:  # named, not a traceback from deep inside the plugin
            disabled(source, f"cannot load it ({type(e).__name__}: {e})")
    return folders


def find_tasks(include: tuple[Path, ...] | list[Path] = ()) -> dict[str, FoundTask]:
    """Every task: the built-ins, the entry points', then each included folder's; a name may be
    defined once. A plugin whose tasks do not load (a bad file, a name taken) is disabled
    whole, with a warning; a bad included folder, which the user named, is an error."""
    found = _folder_tasks(resource_dir("tasks"), "built-in", {})
    for folder, source in plugin_folders():
        try:
            found.update(_folder_tasks(folder, source, found))
        except ConfigError as e:
            disabled(source, str(e))
    for folder in include:
        found.update(_folder_tasks(Path(folder), str(folder), found))
    return found


def _folder_tasks(folder: Path, source: str, found: dict[str, FoundTask]) -> dict[str, FoundTask]:
    """The tasks of one folder, none of whose names may be in `found` already."""
    tasks: dict[str, FoundTask] = {}
    for file in task_files(folder):
        spec = load_task_file(file)
        if spec.name in found or spec.name in tasks:
            other = (found.get(spec.name) or tasks[spec.name]).file
            raise ConfigError(f"task {spec.name!r} is defined twice: in {other} and in {file}")
        tasks[spec.name] = FoundTask(spec, file, source)
    return tasks


def get_task(name: str, include: tuple[Path, ...] | list[Path] = ()) -> TaskSpec:
    tasks = find_tasks(include)
    if name not in tasks:
        raise UnknownNameError("task", name, list(tasks))
    return tasks[name].spec


def check_task_data(task: TaskSpec) -> None:
    """Read a task's data and question files now, so a malformed row fails before any work."""
    from em_bench.data import read_chat_jsonl
    from em_bench.questions import load_question_file

    for part, data in (("train", task.train), ("retain", task.retain)):
        if data is None or data.organism is not None:
            continue
        try:
            read_chat_jsonl(data.file())
        except DataUnavailable as e:
            raise DataUnavailable(f"task {task.name}: {part} data {e}") from None
    own = task.in_domain
    for file in (task.questions, task.selection_questions, own and own.questions,
                 own and own.selection_questions):
        if file is not None:
            load_question_file(pointed_to(file))
    if task.rai_suite is not None:
        from em_bench.rai_suite import load_rai_suite

        load_rai_suite(pointed_to(task.rai_suite))


@dataclass(frozen=True)
class FolderCheck:
    """What `em-bench tasks validate` finds in a folder of task files."""

    valid: list[str]  # the valid tasks' names, those with data elsewhere included
    elsewhere: list[DataUnavailable]  # valid tasks whose public data is not on this machine
    errors: list[EmBenchError]  # one a bad file


def check_task_folder(folder: Path) -> FolderCheck:
    """Load every task file of `folder` and read its data, keeping each file's problem rather
    than stopping at the first."""
    check = FolderCheck([], [], [])
    for file in task_files(folder):
        try:
            spec = load_task_file(file)
            check_task_data(spec)
        except DataUnavailable as e:  # a valid task whose public data is elsewhere
            check.elsewhere.append(e)
        except EmBenchError as e:
            check.errors.append(e)
            continue
        check.valid.append(spec.name)
    return check
