"""How big a study must be, from a pilot store (em_bench/power.py's model).

    em-bench plan --p1 0.05 --p2 0.10 --power 0.8 --store PILOT

The pilot's scored fine-tune cells give the variance of the headline EM flag between seeds,
between topics and between answers (each setting's own rate taken out), and how long a cell and
an answer took here. Topics are the held-out suite's and questions per topic the world's, so a
design's knobs are seeds and samples per question; the plan is the fewest answers per topic
that reach the power at each seed count, with its cells and minutes (grid/cost.py's Workload,
the cost model `em-bench run --dry-run` uses too).
"""

from __future__ import annotations

import math
import statistics
import time

import pandas as pd

from em_bench import power
from em_bench.board.paired import Headline
from em_bench.errors import ConfigError
from em_bench.grid.cost import Workload
from em_bench.store import Store

ROWS = 2  # a comparison is two rows, e.g. a defense and none


def pilot_flags(store: Store) -> pd.DataFrame:
    """Every scored fine-tune cell's headline flags, with its setting as `row` (the base model
    is not a row anyone compares: it has no fine-tune's seed-to-seed spread)."""
    frames, headline = [], Headline(store)
    for cell in store.done_cells("score"):
        record = cell.read_config() or {}
        if record.get("task") in (None, "base"):
            continue
        flags = headline.flags(cell.id)
        config = record["config"]
        frames.append(flags.assign(row=f"{record['task']}/{record['defense']}/"
                                       f"{record.get('defense_params')}/{config.get('train')}"))
    if not frames:
        raise ConfigError(f"{store.root}: no scored fine-tune cell to take a pilot's variance "
                          f"from; run a few seeds first (em-bench run --seeds 0,1,2)")
    return pd.concat(frames, ignore_index=True)


def pilot_costs(store: Store) -> tuple[float, float]:
    """(seconds a fine-tune cell takes before it answers, seconds an answer takes), medians over
    the pilot's fine-tune cells, from their start and their steps' finish times."""
    train, answer = [], []
    for cell in store.done_cells("score"):
        record = cell.read_config() or {}
        started = (record.get("provenance") or {}).get("time")
        trained, generated = cell.finished_at("train"), cell.finished_at("generate")
        n = len(cell.records("generations"))
        if record.get("task") == "base" or not (started and trained and generated and n):
            continue
        train.append(trained - time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S%z")))
        answer.append((generated - trained) / n)
    if not train:
        raise ConfigError(f"{store.root}: no fine-tune cell records its times")
    return statistics.median(train), statistics.median(answer)


def size_study(store: Store, p1: float, p2: float, target: float = 0.8, alpha: float = 0.05,
               max_seeds: int = 10, simulate: int = 0) -> dict:
    """The pilot's variance components and, per seed count, the smallest design telling p1
    from p2 at the target power: answers per topic, the samples per question that give them,
    its cells and minutes here; with `simulate` > 0, each design's power checked by that many
    simulated studies (power.simulate_power)."""
    flags = pilot_flags(store)
    try:
        components = power.variance_components(flags)
    except ValueError as e:  # e.g. a single seed: no spread between seeds to measure
        raise ConfigError(f"{store.root}: the pilot {e}; run a setting over a few seeds first "
                          f"(em-bench run --seeds 0,1,2)") from None
    clusters = flags["cluster"].nunique()
    questions = flags.groupby("cluster")["question_id"].nunique().min()  # per topic
    cell_s, answer_s = pilot_costs(store)
    options = []
    for d in power.plan(p1, p2, components, target, alpha, clusters=clusters,
                        max_seeds=max_seeds):
        n = d.answers_per_cluster
        simulated = None if n is None or not simulate else power.simulate_power(
            p1, p2, components, d.seeds, clusters, n, n_sim=simulate, alpha=alpha)
        # grid/cost.py's arithmetic, as a dry run's; a design reaching no target has no
        # answer count, and never ends
        work = Workload.of_rows(ROWS, d.seeds, d.total_answers or 0)
        options.append({"seeds": d.seeds, "answers_per_topic": n, "power": d.power,
                        "simulated_power": simulated,
                        "samples_per_question": None if n is None else math.ceil(n / questions),
                        "cells": work.cells,
                        "minutes": math.inf if d.total_answers is None
                        else work.minutes(cell_s, answer_s)})
    return {"p1": p1, "p2": p2, "power": target, "alpha": alpha,
            "components": components.to_dict(), "topics": int(clusters),
            "questions_per_topic": int(questions), "seconds_per_cell": cell_s,
            "seconds_per_answer": answer_s, "designs": options}


def format_size(size: dict) -> str:
    """The plan as text: the pilot's figures, then one line a seed count."""
    c = size["components"]
    lines = [f"telling EM {100 * size['p1']:g}% from {100 * size['p2']:g}% at power "
             f"{size['power']:g} (alpha {size['alpha']:g}, two-sided)",
             f"pilot: variance between seeds {c['seed']:.4f}, topics {c['cluster']:.4f}, answers "
             f"{c['answer']:.4f} at EM {100 * c['p']:.1f}%; {size['topics']} held-out topics of "
             f"{size['questions_per_topic']} questions; a fine-tune {size['seconds_per_cell']:.0f}"
             f" s, an answer {size['seconds_per_answer']:.3f} s here",
             f"{'seeds':>5}  {'answers/topic':>13}  {'samples/question':>16}  {'power':>5}  "
             f"{'simulated':>9}  {'cells':>5}  {'minutes':>7}"]
    for d in size["designs"]:
        if d["answers_per_topic"] is None:
            lines.append(f"{d['seeds']:>5}  {'-':>13}  {'-':>16}  {d['power']:5.2f}  "
                         f"(not reachable with {d['seeds']} seeds)")
            continue
        simulated = "-" if d["simulated_power"] is None else f"{d['simulated_power']:.2f}"
        lines.append(f"{d['seeds']:>5}  {d['answers_per_topic']:>13}  "
                     f"{d['samples_per_question']:>16}  {d['power']:5.2f}  {simulated:>9}  "
                     f"{d['cells']:>5}  {d['minutes']:>7.0f}")
    return "\n".join(lines)
