"""The results store: one folder per cell, append-only JSONL streams, atomic JSON files.

This package is the only code that knows where a store and a cell keep their files; the rest
of em-bench asks a Store or a Cell for a path or a record. The layout, and who writes each
entry:

    <root>/store.json                   {"store_schema": 1}  (open_store)
    <root>/cells/<cell_id>/             one cell, below
    <root>/verdicts.jsonl               the LLM judges' cached verdicts (VerdictLog, judge/llm.py)
    <root>/verdicts/<2 hex>/<key>.json  an older store's verdicts, moved into verdicts.jsonl
    <root>/analyses/<kind>_<key>.json   `em-bench analyze` (concepts_<model identity hash>)
    <root>/slurm/                       submitit's job pickles and logs (grid/slurm.py), unless
                                        `--slurm-folder` names another folder

    <cell>/cell.json                    the cell's full config, provenance included (pipeline)
    <cell>/lock                         while a process works on the cell: its host and pid
                                        (CellLock; `lock.break` while one takes a stale lock over)
    <cell>/steps/<step>.done            a finished step and the hash of its inputs (pipeline):
                                        train, generate, lm_eval, judge, jury/<juror>, score
    <cell>/generations.jsonl            the answers (pipeline)
    <cell>/judgments.jsonl              the cell's judge's judgments (pipeline)
    <cell>/jury/<juror>.jsonl           each juror's judgments (pipeline, scoring.jury_stream)
    <cell>/lm_eval.json                 lm-eval's results (pipeline)
    <cell>/metrics.json                 the scores (pipeline)
    <cell>/curve.jsonl                  the EM rate during the fine-tune, with `eval_every`
                                        (pipeline)
    <cell>/trained/                     the LoRA adapter or full weights (train.fine_tune)
    <cell>/resume/step-<N>/             an unfinished fine-tune's latest checkpoint: state.pt,
                                        stamp.json (train.checkpoint); removed once trained
    <cell>/train/log.jsonl              the fine-tune's per-step log (train.fine_tune)
    <cell>/train/summary.json           its final terms, time and peak memory (train.fine_tune)
    <cell>/train/torchrun.log           a sharded fine-tune's processes' output (train.distributed)
    <cell>/train/error-<rank>.txt       the error a process of one failed with (train.distributed)
    <cell>/train/sharding.json          its processes and rank 0's share (train.distributed)
    <cell>/train/checkpoints/step-<N>.safetensors
                                        its trainable weights at the steps scored for the curve
                                        (train.distributed)

A step another cell finished on the same inputs is copied, not redone (Cell.copy_step_outputs):
train copies trained/, train/ and curve.jsonl; generate generations.jsonl; lm_eval lm_eval.json.

Appends are flushed and fsynced one record at a time, so a crash leaves at most a truncated last
line; readers skip it and the next append repairs it. Every other file is written whole or not
at all (files.py).
"""

from em_bench.store.cell import REUSABLE_STEPS, Cell
from em_bench.store.files import atomic_file, atomic_folder, atomic_write_json, atomic_write_text
from em_bench.store.lock import CellLock
from em_bench.store.store import STORE_SCHEMA, Store, open_store
from em_bench.store.verdicts import VerdictLog

__all__ = ["REUSABLE_STEPS", "STORE_SCHEMA", "Cell", "CellLock", "Store", "VerdictLog",
           "atomic_file", "atomic_folder", "atomic_write_json", "atomic_write_text",
           "open_store"]
