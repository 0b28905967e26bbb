"""Task specs: what a task trains on, what it is evaluated on, and how in-domain is scored.

Tasks are YAML files validated at load. They come from the built-in `tasks/` folder, from
folders the user includes (`--include DIR`) and from installed packages' entry points in the group
`em_bench.tasks` (each names a folder of task files, or a function returning one). A relative
file path in a task file (data, questions) is read from the task file's folder.
"""

from em_bench.tasks.found import (
    FolderCheck,
    FoundTask,
    check_task_data,
    check_task_folder,
    find_tasks,
    get_task,
    plugin_folders,
    task_files,
)
from em_bench.tasks.spec import (
    InDomain,
    OrganismData,
    TaskSpec,
    TrainData,
    chats,
    in_domain_file,
    load_task_file,
    pointed_to,
    question_file,
)

__all__ = ["FolderCheck", "FoundTask", "InDomain", "OrganismData", "TaskSpec", "TrainData",
           "chats", "check_task_data", "check_task_folder", "find_tasks", "get_task",
           "in_domain_file", "load_task_file", "plugin_folders", "pointed_to", "question_file",
           "task_files"]
