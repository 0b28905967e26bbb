"""How a row's strength was chosen: the stored selection (em_bench/grid/tune.py) whose pick it
runs at, so a reader sees a tuned row, an exempt one and an untuned one apart.

A selection records the exact parameters its cells ran with at the pick (`params`), and a
cell's card the parameter each of its defense's components is tuned by (`strengths`), so this
matches the two without loading any defense."""

from __future__ import annotations

_PREFIX = "."  # a combination's parameters are COMPONENT.NAME (em_bench.defenses.PREFIX)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
    return a == b


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def _one(part: str, strength: str | None, own: dict, selections: list[dict],
         model: str) -> str:
    if strength is None:
        return f"{part}: exempt (no strength to tune)"
    for s in selections:
        if s["defense"] != part or not _equal(own, s.get("params") or {}):
            continue
        where = (f"{s['task']}, seeds {','.join(map(str, s['seeds']))}"
                 + ("" if s["model"] == model else f", tuned on {s['model']}"))
        if s["pick"] is None:
            return f"{part}: no admissible {strength}; run at its default ({where})"
        return f"{part}: {strength}={s['pick']:g}, the rule's pick ({where})"
    return f"{part}: {strength}={own.get(strength)} (not tuned)"


def chosen_text(row: dict, selections: list[dict]) -> str:
    """How each component of a row's defense got its strength; '-' for no defense (or a cell
    whose card predates the strengths it names)."""
    strengths = (row.get("card") or {}).get("strengths")
    if not strengths:
        return "-"
    params = row["defense_params"] or {}
    combined = len(strengths) > 1

    def own(part: str) -> dict:
        prefix = f"{part}{_PREFIX}"
        return ({k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
                if combined else params)

    return "; ".join(_one(part, strength, own(part), selections, row["model"])
                     for part, strength in strengths.items())
