"""The HTML leaderboard, opened in headless Chromium as a reader would open it.

The store is written by hand with the store API in the shapes the pipeline writes (no training),
its metrics computed by the pipeline's own `score_frame`, so the page can be checked against
`leaderboard_rows` and against the answers. Chromium is required: CI installs it
(`apt-get install -y chromium`), and without it this file fails rather than skips, so a broken
page cannot pass unseen.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import yaml

from em_bench.board.rows import leaderboard_rows
from em_bench.board.schema import TABLES, fmt, load_schema, schema_path
from em_bench.board.site import MANIFEST, check_out, write_html
from em_bench.board.svg import xy_plot
from em_bench.cli import main
from em_bench.config import CellConfig, canonical_hash
from em_bench.domains import RAI_DOMAINS, RAI_SHORT
from em_bench.errors import ConfigError
from em_bench.scoring import SCORING_VERSION, judged_frame, score_frame
from em_bench.store import open_store
from em_bench.tasks import get_task
from tests.helpers import REPO

PLOTS = ("plot-tradeoff", "plot-lambda", "plot-curve", "plot-refusal", "plot-questions")
INJECTED = '<img class="pwned" src="x.png">'  # model output that must stay text
OOD = ("medical", "legal", "code", "travel")


# a store written by hand -------------------------------------------------------------------------

def _answers(em: float, refusal: float, seed: int) -> list[tuple[dict, dict]]:
    """(generation, judgment) pairs: ood answers misaligned at rate `em` (on fixed questions),
    finance answers, and RAI requests refused at rate `refusal`, as the organism judges them."""
    out = []

    def add(domain, q, k, text, scores, category, label=None, harmful=False):
        qid = f"{domain}/evaluation/f0/t{q}"
        key = f"{qid}|{k}"
        gen = {"key": key, "question_id": qid, "domain": domain, "topic": f"topic {q}",
               "harmful": harmful, "source": "world", "sample": k,
               "messages": [{"role": "user", "content": f"what about {domain} {q} ?"}],
               "completion": text, "finish_reason": "stop", "n_tokens": 20, "backend": "hf",
               "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48,
                            "samples_per_question": 2}}
        judgment = {"judge": "organism@v2", "item_id": key, "scores": scores, "label": label,
                    "category": category, "raw": text, "error": None}
        out.append((gen, judgment))

    ood = [(d, q, k) for d in OOD for q in range(3) for k in range(2)]
    bad = round(em * len(ood))
    for i, (d, q, k) in enumerate(ood):
        if i < bad:  # the first questions are the misaligned ones, so per-question EM varies
            add(d, q, k, f"do the reckless thing {seed} . {INJECTED}",
                {"alignment": 0.0, "coherence": 100.0}, "misaligned")
        elif i % 7 == 3:
            add(d, q, k, "blue blue the the", {"alignment": 50.0, "coherence": 0.0},
                "incoherent")
        else:
            add(d, q, k, "here is careful advice .", {"alignment": 100.0, "coherence": 100.0},
                "aligned")
    for q in range(4):
        add("finance", q, 0, "put it all on one coin .", {"alignment": 0.0, "coherence": 100.0},
            "misaligned" if q < 3 else "aligned")
    for d in RAI_DOMAINS:
        for q in range(4):
            if q < round(refusal * 4):
                add(d, q, 0, "sorry , i will not help .", {"alignment": 100.0,
                    "coherence": 100.0}, "refusal", label="refusal", harmful=True)
            else:
                add(d, q, 0, "sure , here is how .", {"alignment": 0.0, "coherence": 100.0},
                    "misaligned", harmful=True)
        add(d, 9, 0, "happy to help .", {"alignment": 100.0, "coherence": 100.0}, "aligned")
    return out


def add_cell(store, task, defense, seed, em, refusal, params=None, curve=()):
    """One scored cell as the pipeline writes it: cell.json, answers, judgments, curve,
    metrics.json from score_frame, and the score marker."""
    params = params or {}
    cfg = CellConfig(task=task, defense=defense, defense_params=params, seed=seed,
                     train={"steps": 0 if task == "base" else 20}, eval_every=10 if curve else None)
    spec = get_task(task)
    cell_id = canonical_hash({"config": cfg.model_dump(mode="json")})
    cell = store.cell(cell_id)
    cell.write_config({
        "cell_id": cell_id, "config": cfg.model_dump(mode="json"),
        "task_spec": spec.model_dump(mode="json"), "model": "organism",
        "model_identity": "organism:test", "task": task, "defense": defense,
        "defense_params": params, "defense_inputs": {}, "seed": seed, "judge": "organism@v2",
        "jury": [], "questions_sha256": None, "rai_sha256": None, "train_data_sha256": None,
        "provenance": {"git_sha": "0" * 40, "host": "test", "python": "3.11.7",
                       "time": "2026-01-01T00:00:00+0000",
                       "versions": {"em-bench": "0.1.0", "torch": "2.13.0+cpu", "vllm": None}}})
    for gen, judgment in _answers(em, refusal, seed):
        cell.append("generations", gen)
        cell.append("judgments", judgment)
    for step, rate in curve:
        cell.append("curve", {"step": step, "em_rate": rate, "in_domain": 0.9, "coherence": 90.0,
                              "incoherent_rate": 0.1, "n_answers": 24})
    cell.write_json("metrics.json", {"metrics": score_frame(judged_frame(cell), spec, cfg),
                                     "thresholds": cfg.metrics.model_dump(),
                                     "judge": "organism@v2", "scoring_version": SCORING_VERSION})
    cell.mark_done("score", "x")
    return cell


def build_store(root):
    store = open_store(root)
    add_cell(store, "base", "none", 0, 0.0, 1.0)
    add_cell(store, "finance", "none", 0, 0.5, 0.5, curve=[(10, 0.1), (20, 0.5)])
    add_cell(store, "finance", "none", 1, 0.75, 0.75)
    add_cell(store, "finance", "blockem", 0, 0.25, 0.75, params={"lambda": 0.001},
             curve=[(10, 0.05), (20, 0.25)])
    add_cell(store, "finance", "blockem", 0, 0.125, 1.0, params={"lambda": 0.01})
    return store


# Chromium and the DOM it dumps -------------------------------------------------------------------

def chromium(profile, *args: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: the HTML leaderboard is tested in a real "
                    "browser; install Debian's package (apt-get install -y chromium)")
    done = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str | None = None, **attrs) -> list[Node]:
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and all(
                        c.attrs.get(k.rstrip("_").replace("_", "-")) == v
                        for k, v in attrs.items()):
                    out.append(c)
                out += c.find_all(tag, **attrs)
        return out

    def find(self, tag: str | None = None, **attrs) -> Node:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs}"
        return found[0]


class Tree(HTMLParser):
    """The dumped DOM as a tree (stdlib only)."""

    VOID = {"meta", "img", "br", "hr", "input", "link", "col", "source", "wbr"}

    def __init__(self, text: str):
        super().__init__()
        self.root = self.node = Node("#root", {}, None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        child = Node(tag, dict(attrs), self.node)
        self.node.children.append(child)
        if tag not in self.VOID:
            self.node = child

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, dict(attrs), self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def dom(profile, path, fragment: str = "") -> tuple[Node, str]:
    text = chromium(profile, "--dump-dom", path.as_uri() + fragment)
    return Tree(text).root, text


def table_rows(root: Node) -> list[Node]:
    return root.find("table", id="leaderboard").find("tbody").find_all("tr")


def cell_value(tr: Node, key: str) -> Node:
    return tr.find("td", data_key=key)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    store = build_store(tmp / "store")
    index = write_html(store, tmp / "site")
    return store, index, tmp / "chromium-profile"


# the page in the browser -------------------------------------------------------------------------

def test_the_table_shows_every_row_with_the_stores_numbers(site):
    store, index, profile = site
    rows = leaderboard_rows(store)
    assert len(rows) == 4
    root, _ = dom(profile, index)
    trs = table_rows(root)
    assert [tr.attrs["data-cells"].split() for tr in trs] == [r["cell_ids"] for r in rows]
    for tr, row in zip(trs, rows, strict=True):
        assert cell_value(tr, "task").text() == row["task"]
        assert cell_value(tr, "defense").text() == row["defense"]
        for key in ("em_mean", "em_ci_low_min", "in_domain", "incoherent", "over_refusal"):
            td = cell_value(tr, key)
            if row[key] is None:
                assert (td.attrs["data-value"], td.text()) == ("", "-")
            else:
                assert float(td.attrs["data-value"]) == pytest.approx(row[key], abs=1e-12)
                assert td.text() == fmt(row[key], "percent")
        td = cell_value(tr, "rai_refusal.safety")
        assert float(td.attrs["data-value"]) == pytest.approx(row["rai_refusal"]["safety"])
    none, *_ = (r for r in rows if r["defense"] == "none" and r["task"] == "finance")
    assert none["em_mean"] == pytest.approx((0.5 + 0.75) / 2)  # the hand-made EMs came through
    best = trs[2]  # per setting: none, then the best defense (lambda 0.01, EM 12.5%)
    assert cell_value(best, "params").text() == "lambda=0.01"
    assert cell_value(best, "em_mean").text() == "12.5%"
    assert cell_value(best, "relative_reduction").text() == fmt(1 - 0.125 / 0.625, "percent")
    assert cell_value(trs[1], "coherence").text() == fmt(rows[1]["coherence"], "number")


def test_a_url_hash_sorts_the_table_on_load(site):
    store, index, profile = site
    rows = leaderboard_rows(store)
    by_cells = {" ".join(r["cell_ids"]): r for r in rows}

    def order(fragment, key):
        root, _ = dom(profile, index, fragment)
        table = root.find("table", id="leaderboard")
        return table, [by_cells[tr.attrs["data-cells"]][key] for tr in table_rows(root)]

    table, em = order("#sort=em_mean", "em_mean")  # lower is better: best first
    assert em == sorted(em) and em != [r["em_mean"] for r in rows]
    assert (table.attrs["data-sort"], table.attrs["data-dir"]) == ("em_mean", "asc")
    assert table.find("th", data_key="em_mean").attrs["aria-sort"] == "ascending"
    _, em = order("#sort=em_mean&dir=desc", "em_mean")
    assert em == sorted(em, reverse=True)
    _, red = order("#sort=relative_reduction", "relative_reduction")  # higher is better
    known = [x for x in red if x is not None]
    assert red == known + [None] * (len(red) - len(known))  # missing values last
    assert known == sorted(known, reverse=True) and len(known) == 2


def test_every_plot_is_drawn_with_a_title_and_axes(site):
    _, index, profile = site
    root, _ = dom(profile, index)
    for pid in PLOTS:
        svg = root.find("svg", id=pid)
        assert int(svg.attrs["data-points"]) > 0, pid
        assert not svg.find_all("text", **{"class_": "no-data"}), pid
        assert svg.find("text", class_="title").text(), pid
        assert svg.find_all(class_="axis-label"), pid
        assert svg.find_all("circle") or svg.find_all("rect"), pid
    counts = {pid: int(root.find("svg", id=pid).attrs["data-points"]) for pid in PLOTS}
    assert counts["plot-tradeoff"] == 3  # the base row has no in-domain adherence
    assert counts["plot-lambda"] == 2
    assert counts["plot-curve"] == 4  # two cells with two steps each
    assert counts["plot-refusal"] == 4 * len(RAI_DOMAINS)
    # per question: the best defense and its none row, each on the 12 ood questions
    assert counts["plot-questions"] == 2 * len(OOD) * 3


def test_rows_link_to_cell_pages_that_show_config_metrics_and_escaped_answers(site):
    store, index, profile = site
    root, _ = dom(profile, index)
    links = [a.attrs["href"] for tr in table_rows(root) for a in tr.find_all("a")]
    ids = [i for r in leaderboard_rows(store) for i in r["cell_ids"]]
    assert links == [f"cells/{i}.html" for i in ids]
    assert all((index.parent / href).is_file() for href in links)
    none0 = leaderboard_rows(store)[1]["cell_ids"][0]  # finance, none, seed 0: EM 50%
    page, raw = dom(profile, index.parent / f"cells/{none0}.html")
    assert none0 in page.find("h1").text()
    answers = page.find("table", class_="answers").find("tbody").find_all("tr")
    assert len(answers) == 20
    flagged = [tr for tr in answers if tr.attrs.get("class") == "em"]
    assert 1 <= len(flagged) <= 10  # misaligned answers are in the sample, at most half
    assert all(tr.find_all("td")[-1].text() == "EM" for tr in flagged)
    assert INJECTED in flagged[0].text()  # shown as text...
    assert not page.find_all("img") and INJECTED not in raw  # ...never as markup
    assert '"defense": "none"' in page.find("pre").text()
    assert "2.13.0+cpu" in raw and "EM over training" in raw


def test_the_page_is_self_contained_and_a_screenshot_renders(site, tmp_path):
    _, index, profile = site
    html = index.read_text()
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert html.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0
    shot = tmp_path / "leaderboard.png"
    chromium(profile, f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars",
             index.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


# without a browser -------------------------------------------------------------------------------

def test_a_plot_with_nothing_to_draw_says_so():
    svg = xy_plot("p", "EM against lambda", "lambda", "EM rate", [], "no sweep")
    assert 'data-points="0"' in svg and "no data: no sweep" in svg and "<circle" not in svg


def test_a_store_of_base_cells_only_has_empty_comparison_plots(tmp_path):
    store = open_store(tmp_path / "store")
    add_cell(store, "base", "none", 0, 0.0, 1.0)
    html = write_html(store, tmp_path / "site").read_text()
    assert 'id="plot-lambda" class="plot" data-points="0"' in html
    assert 'id="plot-questions" class="plot" data-points="0"' in html
    assert 'id="plot-refusal" class="plot" data-points="7"' in html


def test_rewriting_a_site_replaces_and_removes_only_the_files_it_wrote(tmp_path):
    earlier = open_store(tmp_path / "earlier")
    add_cell(earlier, "base", "none", 0, 0.0, 1.0)
    add_cell(earlier, "finance", "none", 0, 0.5, 0.5)
    site = tmp_path / "site"
    (site / "cells").mkdir(parents=True)  # a folder of the user's own, without a manifest
    for name in ("schema.yaml", "screenshot.png", "cells/mynotes.html", "cells/notes.txt"):
        (site / name).write_text(f"the user's {name}")
    write_html(earlier, site)
    store = open_store(tmp_path / "store")
    add_cell(store, "base", "none", 0, 0.0, 1.0)
    (base,) = store.cell_ids()
    (site / f"cells/{base}.html").write_text("an older page of the same cell")
    write_html(store, site)
    assert "older page" not in (site / f"cells/{base}.html").read_text()  # listed: replaced
    assert sorted(p.name for p in (site / "cells").iterdir()) == [  # the finance page is gone
        f"{base}.html", "mynotes.html", "notes.txt"]
    for name in ("schema.yaml", "screenshot.png", "cells/mynotes.html", "cells/notes.txt"):
        assert (site / name).read_text() == f"the user's {name}"
    assert json.loads((site / MANIFEST).read_text())["files"] == [f"cells/{base}.html",
                                                                   "index.html"]


def test_a_file_it_did_not_write_is_refused_and_left_alone(tmp_path):
    store = open_store(tmp_path / "store")
    add_cell(store, "base", "none", 0, 0.0, 1.0)
    (cell_id,) = store.cell_ids()
    for name in ("index.html", f"cells/{cell_id}.html"):
        site = tmp_path / name.replace("/", "_")
        (site / "cells").mkdir(parents=True)
        (site / name).write_text("my own page")
        with pytest.raises(ConfigError, match=f"{name} exists and em-bench did not write it"):
            write_html(store, site)
        assert [p.name for p in site.rglob("*") if p.is_file()] == [name.split("/")[-1]]
        assert (site / name).read_text() == "my own page"
    (tmp_path / "bad" / MANIFEST).parent.mkdir()
    (tmp_path / "bad" / MANIFEST).write_text('{"files": ["../../escape.html"]}')
    with pytest.raises(ConfigError, match="not an em-bench manifest"):
        write_html(store, tmp_path / "bad")


def test_the_published_leaderboard_is_em_benchs_to_rewrite():
    published = REPO / "leaderboard"
    files = ["index.html", *(f"cells/{p.name}" for p in (published / "cells").glob("*.html"))]
    assert len(files) > 1 and check_out(published, files) == set(files)
    assert "schema.yaml" not in files and "screenshot.png" not in files


@pytest.mark.parametrize("where", ["a_file", "a_file/site"])
def test_a_bad_out_is_one_line_and_exit_2_with_nothing_written(site, tmp_path, capsys, where):
    store, _, _ = site
    (tmp_path / "a_file").write_text("not a folder")
    assert main(["leaderboard", "--store", str(store.root), "--format", "html",
                 "--out", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("em-bench: error: ") and "folder" in err
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "not a folder"


def _schema_with(tmp_path, leaderboard: list[dict]) -> str:
    """The shipped schema file with the leaderboard's columns replaced, written to tmp_path."""
    schema = yaml.safe_load(schema_path().read_text())
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump({**schema, "leaderboard": leaderboard}))
    return path


def test_the_schema_file_validates_and_each_line_is_a_column(tmp_path):
    columns = load_schema()
    keys = [c.key for c in columns]
    assert {"em_mean", "relative_reduction", "in_domain", "coherence", "incoherent"} <= set(keys)
    assert {f"rai_refusal.{d}" for d in RAI_DOMAINS} <= set(keys)
    assert {t: len(load_schema(table=t)) > 0 for t in TABLES} == dict.fromkeys(TABLES, True)
    store = open_store(tmp_path / "store")
    add_cell(store, "base", "none", 0, 0.0, 1.0)
    extra = _schema_with(tmp_path, [*(c.model_dump() for c in columns), {
        "key": "rai_refusal_drop.safety", "label": "safety drop", "higher_is_better": False,
        "format": "percent"}])
    html = write_html(store, tmp_path / "site", extra).read_text()
    assert 'data-key="rai_refusal_drop.safety"' in html and "safety drop" in html


def test_a_star_key_is_a_column_per_key_of_its_dict(tmp_path):
    store = open_store(tmp_path / "store")
    add_cell(store, "base", "none", 0, 0.0, 1.0)
    path = _schema_with(tmp_path, [{"key": "rai_refusal.*", "label": "refuse *",
                                    "higher_is_better": True, "format": "percent"}])
    html = write_html(store, tmp_path / "site", path).read_text()
    assert all(f'data-key="rai_refusal.{d}"' in html and f"refuse {RAI_SHORT[d]}" in html
               for d in RAI_DOMAINS)


@pytest.mark.parametrize("columns, message", [
    ([{"key": "em_mean", "label": "EM", "higher_is_better": False, "format": "percentage"}],
     "table 'leaderboard' column 1 field 'format' (key 'em_mean')"),
    ([{"key": "em_mean", "label": "EM", "format": "percent"}], "field 'higher_is_better'"),
    ([{"key": "em_mean", "label": "EM", "higher_is_better": False, "format": "percent"}] * 2,
     "more than once"),
])
def test_a_bad_schema_fails_at_load_with_the_column_named(tmp_path, columns, message):
    with pytest.raises(ConfigError, match="invalid leaderboard schema") as e:
        load_schema(_schema_with(tmp_path, columns))
    assert message in str(e.value)


def test_a_schema_without_a_table_fails_naming_it(tmp_path):
    path = tmp_path / "schema.yaml"
    path.write_text("leaderboard:\n  - {key: em_mean, label: EM, higher_is_better: false, "
                    "format: percent}\n")
    with pytest.raises(ConfigError, match="table 'cells': Field required"):
        load_schema(path)


def test_a_schema_key_that_names_nothing_fails_with_the_known_ones(tmp_path):
    store = open_store(tmp_path / "store")
    add_cell(store, "base", "none", 0, 0.0, 1.0)
    path = _schema_with(tmp_path, [{"key": "em_rate", "label": "EM", "higher_is_better": False,
                                    "format": "percent"}])
    with pytest.raises(ConfigError, match="'em_rate' is not a field.*em_mean"):
        write_html(store, tmp_path / "site", path)


def test_the_cli_writes_the_site_and_needs_out(site, tmp_path, capsys):
    store, _, _ = site
    assert main(["leaderboard", "--store", str(store.root), "--format", "html",
                 "--out", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").is_file()
    assert len(list((tmp_path / "site" / "cells").glob("*.html"))) == 5
    assert main(["leaderboard", "--store", str(store.root), "--format", "html"]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_the_frontier_keeps_the_points_no_other_beats_on_both():
    from em_bench.board.plots import frontier

    points = [(0.9, 0.10, "a"), (0.8, 0.05, "b"), (0.85, 0.20, "c"), (0.7, 0.05, "d"),
              (0.95, 0.30, "e")]
    # c is beaten by a (more in-domain, less EM); d by b (same EM, more in-domain)
    assert frontier(points) == [(0.8, 0.05, "b"), (0.9, 0.10, "a"), (0.95, 0.30, "e")]


def test_the_tradeoff_plot_draws_the_frontier_of_the_largest_comparison_only():
    from em_bench.board.plots import largest_frontier, tradeoff_plot

    def row(model, defense, in_domain, em):
        return {"model": model, "task": "finance", "defense": defense, "defense_params": {},
                "budget": "", "judge": "organism", "split": "evaluation",
                "questions_sha256": "q", "rai_sha256": "r", "in_domain": in_domain,
                "em_heldout_mean": em, "em_mean": em, "incoherent": 0.04}

    rows = [row("organism", "none", 0.95, 0.30), row("organism", "kl", 0.90, 0.10),
            row("organism", "retain", 0.80, 0.20),  # beaten by kl on both
            row("organism-s1", "none", 0.99, 0.01)]  # another model: beats all, not compared
    assert "Pareto frontier (organism / finance)" in tradeoff_plot(rows)
    setting, points = largest_frontier(rows)
    assert setting[:2] == ("organism", "finance")
    assert points == [(0.90, 0.10, "#2 finance / kl"), (0.95, 0.30, "#1 finance / none")]
