"""A static HTML page of a task file's results: each query beside its top-k candidates, sortable by its metrics.

    <out_dir>/index.html    written by evaluate.py next to per_query.csv; open the file in any browser

One table row per scored query: the query image, its test case and family, its AP and Recall@K (the numbers of
per_query.csv, from `utils.evaluation.score_queries`), then its top-k candidates in ranked order, each tile
labelled with its rank and influence; exemplars (the ground truth, candidate index < n_exemplar) have a red
border and an EXEMPLAR badge. Clicking a column header sorts the rows; `index.html#sort=ap` (descending),
`#sort=ap-asc`, `#sort=query` or `#sort=test_case` opens the page sorted. The page needs no server and no
other file: styles and the few lines of script are inline, and every image is referenced by its path relative
to the page, so the page keeps working when the results folder and the dataroot move together. An image that
does not load is replaced by its file name, and <body data-broken="N"> counts such images.
"""
import html
import os
import urllib.parse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .io import atomic_write
from .evaluation import metric_label
from .tasks import Task, exemplar_paths
from .data import laion_image_paths

PAGE_NAME = "index.html"
TEXT_KEYS = ("query", "test_case")  # sorted ascending by default; every other column descending

_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#111}
h1{font-size:20px;margin:0 0 6px}
.summary{font-size:15px;margin:4px 0 10px}
table{border-collapse:collapse}
table.groups td,table.groups th{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}
table.groups td:first-child,table.groups th:first-child{text-align:left}
#queries th,#queries td{border-bottom:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}
#queries th[data-sort]{cursor:pointer;user-select:none;text-decoration:underline dotted}
#queries th[aria-sort=ascending]::after{content:" \\25B2"}
#queries th[aria-sort=descending]::after{content:" \\25BC"}
.name{font-family:monospace;font-size:12px;max-width:150px;word-break:break-all}
.prompt{font-size:12px;color:#444;max-width:150px}
.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:116px;font-size:11px}
figure img,.missing{width:112px;height:112px;object-fit:cover;display:block;border:2px solid #bbb;box-sizing:border-box}
figure.exemplar img,figure.exemplar .missing{border:5px solid #d01414}
.missing{background:#eee;font-size:10px;padding:4px;word-break:break-all;overflow:hidden}
.badge{background:#d01414;color:#fff;font-weight:bold;padding:0 3px;border-radius:2px}
.notes{color:#8a4b00}
"""

_SCRIPT = """
function broken(img) {
  img.onerror = null;
  var box = document.createElement('div');
  box.className = 'missing';
  box.setAttribute('data-missing', img.getAttribute('data-name'));
  box.textContent = 'image missing: ' + img.getAttribute('data-name');
  img.parentNode.replaceChild(box, img);
  document.body.setAttribute('data-broken', String(+(document.body.getAttribute('data-broken') || 0) + 1));
}
var TEXT_KEYS = %s;
function sortRows(key, dir) {
  var heads = document.querySelectorAll('#queries th[data-sort]'), found = false;
  for (var i = 0; i < heads.length; i++) {
    var mine = heads[i].getAttribute('data-sort') === key;
    found = found || mine;
    if (mine) heads[i].setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending');
    else heads[i].removeAttribute('aria-sort');
  }
  if (!found) return false;
  var text = TEXT_KEYS.indexOf(key) >= 0;
  if (dir !== 'asc' && dir !== 'desc') dir = (text || key === 'order') ? 'asc' : 'desc';
  var sign = dir === 'asc' ? 1 : -1, body = document.querySelector('#queries tbody');
  var rows = Array.prototype.slice.call(body.rows);
  function value(row) {
    var cells = row.querySelectorAll('[data-key]');
    for (var i = 0; i < cells.length; i++) {
      if (cells[i].getAttribute('data-key') === key) {
        var v = cells[i].getAttribute('data-value');
        return text ? v : parseFloat(v);
      }
    }
    return text ? '' : NaN;
  }
  rows.sort(function (a, b) {
    var x = value(a), y = value(b), c;
    if (text) c = sign * (x < y ? -1 : x > y ? 1 : 0);
    else if (isNaN(x) || isNaN(y)) c = isNaN(x) - isNaN(y);  /* NaN last either way */
    else c = sign * (x - y);
    return c || (+a.getAttribute('data-order') - +b.getAttribute('data-order'));
  });
  for (var j = 0; j < rows.length; j++) body.appendChild(rows[j]);
  document.body.setAttribute('data-sort', key + '-' + dir);
  return true;
}
function sortFromHash() {
  var m = /sort=([^&]+)/.exec(location.hash);
  if (!m) return;
  var spec = decodeURIComponent(m[1]), d = /^(.*)-(asc|desc)$/.exec(spec);
  if (d) sortRows(d[1], d[2]); else sortRows(spec, null);
}
document.addEventListener('DOMContentLoaded', function () {
  var heads = document.querySelectorAll('#queries th[data-sort]');
  for (var i = 0; i < heads.length; i++) {
    heads[i].addEventListener('click', function () {
      var key = this.getAttribute('data-sort'), now = document.body.getAttribute('data-sort');
      var dir = now === key + '-desc' ? 'asc' : now === key + '-asc' ? 'desc' : null;
      sortRows(key, dir);
      try { history.replaceState(null, '', '#sort=' + document.body.getAttribute('data-sort')); } catch (e) {}
    });
  }
  sortFromHash();
});
window.addEventListener('hashchange', sortFromHash);
"""


def candidate_path(index: int, n_exemplar: int, exemplars: Optional[Sequence[Path]],
                   laion: Sequence[Path]) -> Optional[Path]:
    """The image file of candidate `index` of a ranking: exemplar `index` when index < n_exemplar, otherwise LAION
    image `index - n_exemplar` of the sorted listing; None when that listing is too short (or no exemplar list)."""
    if index < n_exemplar:
        return Path(exemplars[index]) if exemplars is not None and index < len(exemplars) else None
    j = index - n_exemplar
    return Path(laion[j]) if j < len(laion) else None


def relative_url(path, page_dir) -> Optional[str]:
    """`path` as a URL relative to the folder holding the page (percent-encoded, '/' separators); None when no
    relative path exists (another drive on Windows)."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir))
    except ValueError:
        return None
    return urllib.parse.quote(rel.replace(os.sep, "/"))


def render_report(found: Sequence[Tuple[Task, dict]], rows: Sequence[Dict], summary: Sequence[Dict],
                  metric_names: Sequence[str], dataroot, page_dir, top_k: int = 10, title: str = "results",
                  n_tasks: Optional[int] = None) -> Tuple[str, List[str]]:
    """The page's HTML and a list of notes (problems that left placeholders, e.g. a model whose exemplars cannot
    be listed).

    found: (task, result) from `utils.evaluation.load_results` (result holds `influence`, `rank`, `n_exemplar`);
    rows: `score_queries(found, ks)`, one per entry of found, in the same order; summary: `summarize(rows,
    metric_names)`; dataroot: the folder the task's image paths are relative to; page_dir: the folder the page
    will be written to (image paths are made relative to it); n_tasks: the number of queries in the task file.
    """
    if len(found) != len(rows):
        raise ValueError(f"{len(found)} results but {len(rows)} metric rows")
    laion = laion_image_paths(dataroot)
    exemplars: Dict[str, Optional[List[Path]]] = {}
    notes: List[str] = []
    for task, _ in found:
        if task.model_path not in exemplars:
            try:
                exemplars[task.model_path] = exemplar_paths(dataroot, task)
            except InputError as e:
                exemplars[task.model_path] = None
                notes.append(f"exemplar images of {task.model_path} not shown: {e}")
    body = [_row(order, task, result, row, metric_names, exemplars[task.model_path], laion, dataroot, page_dir,
                 top_k) for order, ((task, result), row) in enumerate(zip(found, rows))]
    heads = ['<th data-sort="order">#</th>', '<th data-sort="query">query</th>',
             '<th data-sort="test_case">test case / family</th>']
    heads += [f'<th data-sort="{html.escape(m)}">{html.escape(_label(m))}</th>' for m in metric_names]
    heads.append(f"<th>top {top_k} candidates (rank, influence)</th>")
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}: attribution results</title>",
        f"<style>{_STYLE}</style>", f"<script>{_SCRIPT % _js_list(TEXT_KEYS)}</script>",
        '</head><body data-broken="0" data-sort="">',
        f"<h1>{e(title)}: attribution results</h1>",
        f'<p class="summary" id="summary">{e(_summary_line(summary, metric_names, len(rows), n_tasks))}</p>',
        _groups_table(summary, metric_names),
        "<p>Exemplars (the ground truth) have a red border and an <span class=\"badge\">EXEMPLAR</span> badge. "
        "Click a column header to sort; a link can carry the order: <code>#sort=ap</code> (descending), "
        "<code>#sort=ap-asc</code>, <code>#sort=query</code>, <code>#sort=test_case</code>.</p>",
    ]
    parts += [f'<p class="notes">{e(n)}</p>' for n in notes]
    parts += ['<table id="queries"><thead><tr>' + "".join(heads) + "</tr></thead><tbody>"]
    parts += body
    parts += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(parts), notes


def write_report(path, found: Sequence[Tuple[Task, dict]], rows: Sequence[Dict], summary: Sequence[Dict],
                 metric_names: Sequence[str], dataroot, top_k: int = 10, title: str = "results",
                 n_tasks: Optional[int] = None) -> Path:
    """Write the page to `path` atomically (arguments as `render_report`; the page folder is path's folder);
    print one warning line per note; return the path."""
    path = Path(path)
    page, notes = render_report(found, rows, summary, metric_names, dataroot, path.parent, top_k, title, n_tasks)
    for n in notes:
        print(f"warning: {n}")
    return atomic_write(path, lambda f: f.write(page), binary=False)


def _label(metric: str) -> str:
    return "AP" if metric == "ap" else metric_label(metric).replace("recall@", "Recall@")


def _js_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def _number(value: float, fmt: str = ".3f") -> str:
    return "nan" if value is None or np.isnan(value) else format(value, fmt)


def _summary_line(summary: Sequence[Dict], metric_names: Sequence[str], n_rows: int, n_tasks: Optional[int]) -> str:
    overall = next((s for s in summary if s["group"] == "all"), None)
    scored = f"{n_rows} queries scored" + (f" of the {n_tasks} in the task file" if n_tasks is not None else "")
    if overall is None:
        return scored
    order = ["ap"] + [m for m in metric_names if m != "ap"]
    cells = [f"{'mAP' if m == 'ap' else _label(m)} {_number(overall[m])} ± {_number(overall[m + '_se'])}"
             for m in order if m in overall]
    return scored + ": " + ", ".join(cells) + " (mean ± standard error)"


def _groups_table(summary: Sequence[Dict], metric_names: Sequence[str]) -> str:
    e = html.escape
    head = "<tr><th>group</th><th>n</th>" + "".join(
        f"<th>{e('mAP' if m == 'ap' else _label(m))}</th>" for m in metric_names) + "</tr>"
    body = ["<tr><td>" + e(str(s["group"])) + f"</td><td>{int(s['n'])}</td>" + "".join(
        f"<td>{_number(s[m])} ± {_number(s[m + '_se'])}</td>" for m in metric_names) + "</tr>" for s in summary]
    return '<table class="groups">' + head + "".join(body) + "</table>"


def _image(path: Optional[Path], page_dir, alt: str, missing_name: str) -> str:
    """An <img> by relative URL that swaps itself for its file name if it does not load; a placeholder when
    there is no file to point to."""
    e = html.escape
    url = relative_url(path, page_dir) if path is not None else None
    if url is None:
        return f'<div class="missing" data-missing="{e(missing_name)}">image missing: {e(missing_name)}</div>'
    return (f'<img src="{e(url)}" alt="{e(alt)}" title="{e(str(path.name))}" data-name="{e(path.name)}" '
            f'onerror="broken(this)">')


def _row(order: int, task: Task, result: dict, row: Dict, metric_names: Sequence[str],
         exemplars: Optional[List[Path]], laion: Sequence[Path], dataroot, page_dir, top_k: int) -> str:
    e = html.escape
    n_ex = int(result["n_exemplar"])
    influence = np.asarray(result["influence"], dtype=np.float64)
    query = Path(dataroot) / task.synth_image_path
    cells = [
        f'<td data-key="order" data-value="{order}">{order + 1}</td>',
        f'<td data-key="query" data-value="{e(task.synth_image_path)}"><figure class="query">'
        f'{_image(query, page_dir, "query", task.synth_image_path)}</figure>'
        f'<div class="name">{e(task.synth_image_path)}</div><div class="prompt">{e(task.prompt)}</div></td>',
        f'<td data-key="test_case" data-value="{e(task.test_case)}">{e(task.test_case)}<br>'
        f'<span class="family">{e(task.family)}</span><br><span class="name">{e(task.model_path)}</span></td>',
    ]
    cells += [f'<td data-key="{e(m)}" data-value="{e(repr(float(row[m])))}">{_number(float(row[m]))}</td>'
              for m in metric_names]
    tiles = []
    for position, index in enumerate(np.asarray(result["rank"])[:top_k]):
        index = int(index)
        is_exemplar = index < n_ex
        name = f"exemplar {index}" if is_exemplar else f"LAION {index - n_ex}"
        path = candidate_path(index, n_ex, exemplars, laion)
        badge = ' <span class="badge">EXEMPLAR</span>' if is_exemplar else ""
        tiles.append(
            f'<figure class="tile{" exemplar" if is_exemplar else ""}" data-rank="{position + 1}" '
            f'data-candidate="{index}" data-exemplar="{int(is_exemplar)}" '
            f'data-influence="{e(repr(float(influence[index])))}">'
            f'{_image(path, page_dir, name, name)}'
            f'<figcaption>#{position + 1} {e(name)}{badge}<br>influence {_number(influence[index], ".3g")}'
            f'</figcaption></figure>')
    cells.append('<td><div class="strip">' + "".join(tiles) + "</div></td>")
    return f'<tr class="query-row" data-order="{order}">' + "".join(cells) + "</tr>"
