"""Tuning a defense by the selection rule (em_bench/selection.py) on real cells.

    em-bench tune --task finance --defense kl --seeds 0 1

Every strength the rule asks for is a grid of cells on the selection split (the task, the
defense at that strength, each seed), run or resumed in the store like any other; its outcome is
the seed means of EM on the development domains (never the held-out ones the headline scores),
in-domain adherence and the incoherent share, in the task's own view. The sweep and its pick are
stored in the store as an analysis, so the leaderboard can show how a row was chosen.
"""

from __future__ import annotations

from pathlib import Path

from em_bench import metrics
from em_bench.config import canonical_hash
from em_bench.defenses import check_defense, components, is_combination
from em_bench.errors import ConfigError, NoLatentKept
from em_bench.grid.plan import plan_grid
from em_bench.grid.run import run_grid
from em_bench.registry import DEFENSES, model_settings
from em_bench.selection import Outcome, Selection, not_runnable, tune
from em_bench.store import Store
from em_bench.store.files import atomic_write_json


def strength_of(defense: str) -> str:
    """The parameter the rule sweeps for `defense`, or a ConfigError for one without any (a
    combination is exempt: each component runs at its own pick)."""
    if is_combination(defense):
        raise ConfigError(f"defense {defense} is a combination: each component at its own pick, "
                          f"not tuned jointly, so it is exempt from the selection rule; tune "
                          f"{' and '.join(components(defense))} one by one and set their picks")
    name = getattr(DEFENSES.get(defense), "strength", None)
    if name is None:
        raise ConfigError(f"defense {defense} has no strength to sweep (no `strength` "
                          f"parameter): it is exempt from the selection rule")
    return name


def strength_maximum(defense: str, strength: str) -> float | None:
    """The largest value the strength parameter takes: its `le` bound, or just under its `lt`
    bound (three significant digits, as every swept strength); None when unbounded."""
    params = DEFENSES.get(defense).Params
    field = next(f for name, f in params.model_fields.items()
                 if strength in (name, f.alias))
    for bound in field.metadata:
        if getattr(bound, "le", None) is not None:
            return float(bound.le)
        if getattr(bound, "lt", None) is not None:
            return float(f"{bound.lt * (1 - 1e-3):.3g}")
    return None


def outcome(rows: list[dict], task: str) -> Outcome:
    """The seed means of a setting's rows in the task's own view. EM is the development
    domains' on the world's suite; a task's question file has no world domains, and its
    selection questions share no theme with its evaluation ones, so there it is the suite's."""
    own = [r for r in rows if r["task"] == task and r["view"] == task]
    if not own:
        raise ConfigError(f"no scored cell of task {task} among the rows")

    def mean(key: str) -> float:
        return metrics.seed_summary([r[key] for r in own if r.get(key) is not None])["mean"]

    em = "em_development" if any(r.get("em_development") is not None for r in own) else "em_rate"
    return Outcome(mean(em), mean("in_domain"), mean("incoherent_rate"), len(own))


def tune_defense(store: Store, task: str, defense: str, seeds: list[int],
                 model: str = "organism", train_overrides: dict | None = None,
                 executor=None, fixed: dict[str, str] | None = None,
                 judge: str = "organism", anchor: float | None = None,
                 include: tuple[Path, ...] | list[Path] = ()) -> Selection:
    """Run the selection rule for `defense` on `task` over `seeds`; store and return it.
    The cells train and answer by `model`'s preset (as `em-bench run`'s do), under
    `train_overrides`, and are scored by `judge`. `fixed`: the defense's other parameters, held
    at one value through the sweep (blockem's `latents`, interleave's `pick`): each such form is
    a method of its own, tuned on its own. `anchor`: the strength the rule starts from in place
    of the default, for a defense whose default is unknown on this model (blockem's lambda on a
    model with its own SAE); it is stored as the sweep's default. `include`: folders of task
    YAMLs where `task` may be found (as for `em-bench run`)."""
    strength = strength_of(defense)
    fixed = fixed or {}
    if strength in fixed:
        raise ConfigError(f"tune sweeps {defense}'s {strength}; it cannot also be fixed")
    settings = model_settings(model, **(train_overrides or {}))
    model = settings.model  # a preset's hub id, as its cells name the model
    anchored = {} if anchor is None else {strength: str(anchor)}
    default = check_defense(defense, {**fixed, **anchored}, model)[strength]
    base = settings.cell(judge, split="selection")

    def scored(name: str, values: dict | None = None) -> Outcome:
        plan = plan_grid(base, [task], [name], seeds, settings.train, include,
                         defense_values=values)
        return outcome(run_grid(store, plan, executor), task)

    held = {name: [value] for name, value in fixed.items()}
    none = scored("none")
    try:
        selection = tune(defense, strength, default, none,
                         lambda s: scored(defense, {**held, strength: [str(s)]}),
                         strength_maximum(defense, strength))
    except NoLatentKept as e:  # nothing to block at any strength: a finding, stored as one
        selection = not_runnable(defense, strength, default, none, str(e))
    key = {"model": model, "task": task, "defense": defense, "seeds": sorted(seeds),
           "train": train_overrides or {}, **({"fixed": fixed} if fixed else {}),
           **({"judge": judge} if judge != "organism" else {}),  # the organism's: older keys
           **({"anchor": anchor} if anchor is not None else {})}
    at = selection.default if selection.pick is None else selection.pick
    params = check_defense(defense, {**fixed, strength: str(at)}, model)  # the pick's cells'
    record = {**key, **selection.to_dict(), "params": params}
    atomic_write_json(store.analysis_path("selection", canonical_hash(key)), record)
    return selection


def format_selection(selection: Selection) -> str:
    """The sweep as a table, with the pick and the rule's reasons."""
    none = selection.none
    lines = [f"{selection.defense} {selection.strength}: default {selection.default:g}; "
             f"none: EM {100 * none.em:.1f}%, in-domain {100 * none.in_domain:.1f}%, "
             f"incoherent {100 * none.incoherent:.1f}% ({none.seeds} seeds; EM on the "
             f"development domains, selection questions)",
             f"bracket up to {selection.upper:g}: {selection.upper_reason}",
             f"{selection.strength:>10}  {'EM':>6}  {'in-domain':>9}  {'incoherent':>10}"]
    for s, o in selection.sweep:
        mark = "  <- pick" if s == selection.pick else ""
        lines.append(f"{s:>10g}  {100 * o.em:5.1f}%  {100 * o.in_domain:8.1f}%  "
                     f"{100 * o.incoherent:9.1f}%{mark}")
    if selection.not_run:
        return "\n".join([lines[0], f"not run: {selection.not_run}"])
    lines.append(f"pick: {'none' if selection.pick is None else f'{selection.pick:g}'} "
                 f"({selection.reason})")
    return "\n".join(lines)
