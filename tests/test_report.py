"""evaluate.py's index.html, opened in headless Chromium: one row per query, sorted as the URL asks, the numbers of
per_query.csv, the exemplars marked, every image by a relative path that exists, a missing image as a placeholder.

The influence files are synthetic (no pipeline run): each query's exemplars are put at chosen ranks, so its AP is
known in advance.
"""
import csv
import dataclasses
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

import evaluate
from utils.io import save_pickle
from utils.layout import ResultsLayout
from utils.tasks import load_tasks
from utils.data import laion_image_paths

N_EXEMPLAR, N_LAION, TOP_K = 3, 12, 10
# 1-based ranks of the three exemplars, per query of the tiny task file (in its order)
EXEMPLAR_RANKS = [(1, 2, 3), (13, 14, 15), (2, 5, 11), (1, 3, 4)]
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="the `chromium` browser is not installed "
                                    "(apt-get install chromium; .ci/run installs it)")


def expected_ap(ranks):
    return float(np.mean([(i + 1) / r for i, r in enumerate(sorted(ranks))]))


def influence_with_exemplars_at(ranks, n_candidates=N_EXEMPLAR + N_LAION):
    """Influences that rank the exemplars at the given 1-based positions and the LAION images, in order, around them."""
    order = [None] * n_candidates
    for exemplar, r in enumerate(ranks):
        order[r - 1] = exemplar
    laion = iter(range(N_EXEMPLAR, n_candidates))
    order = [c if c is not None else next(laion) for c in order]
    influence = np.empty(n_candidates)
    influence[order] = np.linspace(1.0, -0.4, n_candidates)  # distinct, descending, some negative
    return influence


def write_results(bench, result_dir):
    tasks = load_tasks(bench["task_json"])
    assert len(tasks) == len(EXEMPLAR_RANKS)
    layout = ResultsLayout(result_dir)
    for task, ranks in zip(tasks, EXEMPLAR_RANKS):
        save_pickle(layout.influence_file(task), {"influence": influence_with_exemplars_at(ranks),
                                                  "n_exemplar": N_EXEMPLAR, "task": dataclasses.asdict(task)})
    return tasks, layout.eval_dir(bench["task_json"])


class PageReader(HTMLParser):
    """The parts of the page the tests look at: <body>'s attributes, and per query row its sort values, tiles,
    image sources and placeholders."""

    def __init__(self, text):
        super().__init__()
        self.body, self.rows, self.all_srcs = {}, [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "tr" and "query-row" in (a.get("class") or ""):
            self.rows.append({"values": {}, "tiles": [], "srcs": [], "missing": []})
        if tag == "img":
            self.all_srcs.append(a.get("src"))
        if not self.rows:
            return
        row = self.rows[-1]
        if "data-key" in a:
            row["values"][a["data-key"]] = a.get("data-value")
        if tag == "figure" and "tile" in (a.get("class") or "").split():
            row["tiles"].append(a)
        if tag == "img":
            row["srcs"].append(a.get("src"))
        if "data-missing" in a:
            row["missing"].append(a["data-missing"])


def chromium(args, tmp_path, timeout=90):
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=3000"] + args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def dump_dom(page: Path, fragment: str, tmp_path) -> PageReader:
    return PageReader(chromium(["--dump-dom", page.resolve().as_uri() + fragment], tmp_path))


def per_query_csv(eval_dir):
    with open(eval_dir / "per_query.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_evaluate(bench, result_dir, extra=()):
    evaluate.main(["--task_json", bench["task_json"], "--result_dir", str(result_dir), "--dataroot",
                   bench["dataroot"], "--top_k", str(TOP_K)] + list(extra))


def check_sources_resolve(page: Path, srcs):
    for src in srcs:
        assert src and "://" not in src and not src.startswith(("/", "file:")), src
        assert (page.parent / unquote(src)).is_file(), src


@needs_chromium
def test_page_in_a_browser(tiny_abc, tmp_path):
    tasks, eval_dir = write_results(tiny_abc, tmp_path / "results")
    run_evaluate(tiny_abc, tmp_path / "results")
    page = eval_dir / "index.html"
    source = page.read_text()
    assert "file://" not in source and str(tmp_path) not in source and tiny_abc["dataroot"] not in source
    assert "&lt;new1&gt;" in source  # the prompts are escaped

    table = {r["query"]: r for r in per_query_csv(eval_dir)}
    for task, ranks in zip(tasks, EXEMPLAR_RANKS):
        assert float(table[task.synth_image_path]["ap"]) == pytest.approx(expected_ap(ranks))

    dom = dump_dom(page, "#sort=ap-asc", tmp_path)
    assert dom.body.get("data-sort") == "ap-asc"  # the script ran
    assert dom.body.get("data-broken") == "0"
    assert len(dom.rows) == len(tasks)
    shown = [r["values"]["query"] for r in dom.rows]
    assert shown == sorted(table, key=lambda q: float(table[q]["ap"]))
    exemplars_in_top_k = {t.synth_image_path: sum(r <= TOP_K for r in ranks) for t, ranks in zip(tasks, EXEMPLAR_RANKS)}
    for row in dom.rows:
        query = row["values"]["query"]
        assert row["values"]["ap"] == table[query]["ap"]  # the same number, to the last digit
        assert row["values"]["recall@10"] == table[query]["recall@10"]
        assert [int(t["data-rank"]) for t in row["tiles"]] == list(range(1, TOP_K + 1))
        assert sum(t["data-exemplar"] == "1" for t in row["tiles"]) == exemplars_in_top_k[query]
        assert all((t["data-exemplar"] == "1") == ("exemplar" in t["class"].split()) for t in row["tiles"])
        assert len(row["srcs"]) == TOP_K + 1 and not row["missing"]  # the query and its candidates
        check_sources_resolve(page, row["srcs"])

    shot = tmp_path / "page.png"
    chromium([f"--screenshot={shot}", "--window-size=1600,900", page.resolve().as_uri() + "#sort=ap"], tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        assert im.size == (1600, 900)
        assert len(im.convert("RGB").resize((64, 36)).getcolors(64 * 36)) > 50  # pictures, not a blank page


@needs_chromium
def test_a_missing_image_becomes_its_file_name(tiny_copy, tmp_path):
    _, eval_dir = write_results(tiny_copy, tmp_path / "results")
    run_evaluate(tiny_copy, tmp_path / "results")
    page = eval_dir / "index.html"
    gone = laion_image_paths(tiny_copy["dataroot"])[0]  # LAION 0: in the top 10 of every query here
    gone.unlink()
    expected_broken = sum(unquote(s).endswith("/" + gone.name) for s in PageReader(page.read_text()).all_srcs)
    assert expected_broken > 0

    dom = dump_dom(page, "#sort=ap", tmp_path)
    assert dom.body.get("data-sort") == "ap-desc"
    assert dom.body.get("data-broken") == str(expected_broken)
    assert len(dom.rows) == 4
    aps = [float(r["values"]["ap"]) for r in dom.rows]
    assert aps == sorted(aps, reverse=True)
    assert sum(r["missing"].count(gone.name) for r in dom.rows) == expected_broken
    assert all(len(r["tiles"]) == TOP_K for r in dom.rows)
    check_sources_resolve(page, [s for r in dom.rows for s in r["srcs"]])  # the others still load


def test_without_the_dataroot_the_tables_are_still_written(tiny_abc, tmp_path, capsys):
    _, eval_dir = write_results(tiny_abc, tmp_path / "results")
    evaluate.main(["--task_json", tiny_abc["task_json"], "--result_dir", str(tmp_path / "results"),
                   "--dataroot", str(tmp_path / "no_such_dataroot")])
    out = capsys.readouterr().out
    assert (eval_dir / "per_query.csv").is_file() and (eval_dir / "summary.md").is_file()
    assert len(per_query_csv(eval_dir)) == len(EXEMPLAR_RANKS)
    assert not (eval_dir / "index.html").exists()
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [
        f"warning: dataroot {tmp_path / 'no_such_dataroot'} not found: tables written without image-level metrics, "
        f"index.html skipped (pass --dataroot)"]
