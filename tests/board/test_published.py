"""The committed leaderboard/ agrees with itself: each row of its index holds the figures its
cells' pages record, and its manifest lists every page. A hand edit or a half-written page
fails here. (The store the pages were written from is not in the repository; the page and the
study are tied by `em-bench study organism`, which writes both.)"""

from __future__ import annotations

import html
import json
import math
import re

import pytest

from tests.helpers import REPO

SITE = REPO / "leaderboard"


def _metrics(cell_id: str) -> dict:
    page = (SITE / "cells" / f"{cell_id}.html").read_text(encoding="utf-8")
    text = page.split("<summary>metrics.json</summary><pre>", 1)[1].split("</pre>", 1)[0]
    return json.loads(html.unescape(text))["metrics"]


def _value(tds: str, key: str) -> float:
    found = re.search(rf'data-key="{re.escape(key)}" data-value="([^"]*)"', tds)
    return float(found.group(1)) if found and found.group(1) else math.nan


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def test_each_published_row_holds_the_figures_of_its_cells_pages():
    rows = re.findall(r'<tr data-cells="([^"]+)">(.*?)</tr>',
                      (SITE / "index.html").read_text(encoding="utf-8"))
    assert len(rows) >= 10
    for cells, tds in rows:
        metrics = [_metrics(cell_id) for cell_id in cells.split()]
        em = _mean([m["em_rate"]["value"] for m in metrics])
        assert _value(tds, "em_mean") == pytest.approx(em, abs=1e-12), cells
        if all("in_domain" in m for m in metrics):
            in_domain = _mean([m["in_domain"]["value"] for m in metrics])
            assert _value(tds, "in_domain") == pytest.approx(in_domain, abs=1e-12), cells
        heldout = _mean([(m.get("em_heldout") or {}).get("value") for m in metrics])
        assert _value(tds, "em_heldout_mean") == pytest.approx(heldout, abs=1e-12,
                                                               nan_ok=True), cells


def test_the_published_manifest_lists_every_page():
    listed = set(json.loads((SITE / "em-bench-manifest.json").read_text())["files"])
    pages = {"index.html", *(f"cells/{p.name}" for p in (SITE / "cells").glob("*.html"))}
    assert listed == pages
