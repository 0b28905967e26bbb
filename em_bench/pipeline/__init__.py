"""The cell runner: fine-tune -> generate -> judge -> score -> store.

Each step is skipped when its done-marker's input hash matches; generate and judge also skip the
items already recorded, so a crash costs at most the batch in flight and a rerun does no work.
"""

from em_bench.pipeline.answers import GENERATE_CHUNK, make_backend
from em_bench.pipeline.judging import MAX_FAILED_SHARE, judge_input
from em_bench.pipeline.resolved import ResolvedCell, eval_prompts, provenance, resolve
from em_bench.pipeline.run import rejudge_cell, run_cell

__all__ = ["GENERATE_CHUNK", "MAX_FAILED_SHARE", "ResolvedCell", "eval_prompts", "judge_input",
           "make_backend", "provenance", "rejudge_cell", "resolve", "run_cell"]
