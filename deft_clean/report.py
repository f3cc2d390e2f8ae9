"""``deft-clean report``: one self-contained HTML page of what ``detect`` found.

The page reads only the results file and the images on disk. It works offline and travels as one file:
thumbnails are small JPEGs embedded as ``data:`` URIs and charts are inline SVG (matplotlib), so there is no
sibling folder to lose and nothing is fetched. A single file is what people attach to a ticket or a mail;
its size is bounded instead by a cap on the gallery (``max_tiles``, lowest ``noise_rank`` first), and the
page states how many flagged images are not shown, overall and per class.

Sections: run summary (backbone, options, counts, time), per-class flagged share and estimated noise rate,
the given → suggested heat map of flagged images, ``p_clean`` histograms of flagged vs kept images, the
gallery (filterable by given and by suggested label) and, with a truth CSV, precision/recall/F1 and the
wrong labels that were missed.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deft_clean import report_charts
from deft_clean.config import ReportConfig
from deft_clean.data import Manifest, load_labels
from deft_clean.errors import DeftCleanError
from deft_clean.files import atomic_file, check_output, releases_outputs
from deft_clean.images import open_image
from deft_clean.progress import Reporter, SilentReporter
from deft_clean.results import read_results, recorded_inputs
from deft_clean.scoring import flag_metrics

MAX_CHART_CLASSES = 30  # charts beyond this many classes become unreadable; the noisiest are drawn


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote: the file, its size, and how much of the flagged set it shows."""

    path: Path
    size_bytes: int
    n_rows: int
    n_flagged: int
    n_shown: int
    n_missing_images: int
    seconds: float


@releases_outputs
def build_report(
    results: str | Path | pd.DataFrame,
    out: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    truth_csv: str | Path | None = None,
    config: ReportConfig = ReportConfig(),
    overwrite: bool = False,
    reporter: Reporter = SilentReporter(),
) -> Report:
    """Write the HTML report of a results file (or the frame ``read_results`` returned) to ``out``
    (default: the results file with the suffix ``.html``), checked before the images are read
    (:func:`check_output`: an existing file is refused unless ``overwrite``, an input of the run always).

    ``data_dir`` is where the images' ``path`` values are relative to (default: the folder detect read,
    from the metadata). ``truth_csv`` (path,label of verified labels) adds precision/recall/F1 and the
    missed wrong labels. Images that cannot be read are shown as a labelled placeholder and counted.
    """
    start = time.perf_counter()
    if isinstance(results, pd.DataFrame):
        if out is None:
            raise DeftCleanError("build_report needs 'out' for a DataFrame.", hint="Pass out='report.html'.")
        frame, name, out_path = results, str(results.attrs.get("out", "results")), Path(out)
    else:
        frame, name = read_results(results), str(results)
        out_path = Path(out) if out is not None else Path(results).with_suffix(".html")
    root = _image_root(frame, data_dir)
    inputs = [results if not isinstance(results, pd.DataFrame) else None, truth_csv]
    check_output(out_path, inputs=inputs + recorded_inputs(frame, out_path.name, root), overwrite=overwrite)
    view = _View.of(frame, truth_csv, title=f"deft-clean report: {Path(name).name}")
    order = view.flagged_order()
    shown = order[: config.max_tiles]
    thumbs = _thumbnails(view.paths[shown], root, config.thumb_px, reporter)
    body = [
        _summary_section(view, len(shown), root),
        _truth_section(view),
        _class_section(view, shown),
        _charts_section(view),
        _gallery_section(view, shown, thumbs),
        _missed_section(view, root, config, reporter),
    ]
    page = _PAGE.format(title=html.escape(view.title), style=_STYLE, body="\n".join(body), script=_SCRIPT)
    with atomic_file(out_path) as partial:
        partial.write_text(page, encoding="utf-8")
    return Report(
        path=out_path,
        size_bytes=out_path.stat().st_size,
        n_rows=len(frame),
        n_flagged=len(order),
        n_shown=len(shown),
        n_missing_images=sum(t is None for t in thumbs),
        seconds=time.perf_counter() - start,
    )


def _image_root(frame: pd.DataFrame, data_dir: str | Path | None) -> Path:
    """The folder the ``path`` column is relative to: ``data_dir``, else the one recorded by detect."""
    recorded = frame.attrs.get("input", {}).get("data_dir")
    root = Path(data_dir) if data_dir is not None else Path(recorded) if recorded else None
    if root is None or not root.is_dir():
        raise DeftCleanError(
            f"Image folder not found: '{root}'.",
            hint="Pass --data-dir: the folder the results' paths are relative to (detect's DATA_DIR).",
        )
    return root


@dataclass
class _View:
    """The results as arrays the sections share. All (N,) over the rows of the results file."""

    title: str
    meta: dict[str, Any]
    names: list[str]  # (K,) readable class names
    paths: np.ndarray  # object, the image paths as in the results
    given: np.ndarray  # int64 class index
    suggested: np.ndarray  # int64 class index, -1 where NA
    p_clean: np.ndarray  # float, NaN for unreadable rows
    rank: np.ndarray  # float, NaN for unreadable rows
    flagged: np.ndarray  # bool
    scored: np.ndarray  # bool: readable rows
    truth: np.ndarray | None  # int64 class index, -1 where unknown

    @classmethod
    def of(cls, frame: pd.DataFrame, truth_csv: str | Path | None, *, title: str) -> _View:
        meta = dict(frame.attrs)
        ids = list(frame["given_label"].cat.categories)
        names = list(meta.get("class_names") or ids)
        given = frame["given_label"].cat.codes.to_numpy(np.int64)
        truth = truth_labels(frame, truth_csv) if truth_csv is not None else None
        return cls(
            title=title,
            meta=meta,
            names=names,
            paths=frame["path"].to_numpy(object),
            given=given,
            suggested=frame["suggested_label"].cat.codes.to_numpy(np.int64),
            p_clean=frame["p_clean"].to_numpy(np.float64, na_value=np.nan),
            rank=frame["noise_rank"].to_numpy(np.float64, na_value=np.nan),
            flagged=frame["is_noisy"].fillna(False).to_numpy(bool),
            scored=(frame["status"] == "ok").to_numpy(bool),
            truth=truth,
        )

    def flagged_order(self) -> np.ndarray:
        """Row indices of the flagged rows, most likely wrong (noise_rank 1) first."""
        rows = np.flatnonzero(self.flagged)
        return rows[np.argsort(self.rank[rows], kind="stable")]

    def missed_order(self) -> np.ndarray:
        """Truly wrong rows (per the truth CSV) that were not flagged, lowest p_clean first (none without)."""
        if self.truth is None:
            return np.zeros(0, np.int64)
        wrong = self.scored & (self.truth >= 0) & (self.truth != self.given) & ~self.flagged
        rows = np.flatnonzero(wrong)
        return rows[np.argsort(self.rank[rows], kind="stable")]


def truth_labels(frame: pd.DataFrame, truth_csv: str | Path) -> np.ndarray:
    """(N,) class index (into the results' class ids) of each row's verified label, -1 where the truth CSV
    has no row; labels may be class ids or names (read by :func:`deft_clean.data.load_labels`)."""
    ids = list(frame["given_label"].cat.categories)
    manifest = Manifest(
        data_dir=Path("."),
        paths=list(frame["path"]),
        labels=frame["given_label"].cat.codes.to_numpy(np.int64),
        class_ids=ids,
        class_names=list(frame.attrs.get("class_names") or ids),
        readable=np.ones(len(frame), bool),
        fingerprint={},
    )
    return load_labels(truth_csv, manifest, allow_missing=True)


def _thumbnails(paths: np.ndarray, root: Path, size: int, reporter: Reporter) -> list[str | None]:
    """A base64 JPEG per path (longest side ``size``), None where the image cannot be read."""
    out: list[str | None] = []
    with reporter.task("Thumbnails", len(paths)):
        for path in paths:
            try:
                image = open_image(root / str(path), draft=size)
            except DeftCleanError:
                out.append(None)
            else:
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=80)
                out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
            reporter.advance()
    return out


def _summary_section(view: _View, n_shown: int, root: Path) -> str:
    meta, detect = view.meta, view.meta.get("detect", {})
    backbone = meta.get("configs", {}).get("backbone", {})
    options = meta.get("configs", {}).get("detect", {})
    total = detect.get("timings", {}).get("total_s")
    n_flagged = int(view.flagged.sum())
    facts = {
        "rows": f"{len(view.given):,}",
        "scored": f"{int(view.scored.sum()):,} ({int((~view.scored).sum()):,} unreadable)",
        "flagged": f"<span id='n-flagged'>{n_flagged:,}</span> "
        f"({n_flagged / max(int(view.scored.sum()), 1):.1%} of scored)",
        "shown below": f"<span id='n-shown'>{n_shown:,}</span> lowest-ranked flagged images; "
        f"<span id='n-hidden'>{n_flagged - n_shown:,}</span> not shown (raise --max-tiles to see more)",
        "backbone": html.escape(f"{backbone['model']} ({backbone.get('pretrained') or 'its default'})")
        if backbone
        else "n/a",
        "detect time": f"{total:,.1f} s on {html.escape(str(detect.get('device')))}" if total else "n/a",
        "made": html.escape(f"{meta.get('created_at')} by deft-clean {meta.get('deft_clean_version')}"),
        "images from": html.escape(str(root)),
    }
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts.items())
    opts = html.escape(", ".join(f"{k}={v}" for k, v in options.items()))
    direction = html.escape(meta.get("score_direction", ""))
    return (
        f"<section id='summary'><h1>{html.escape(view.title)}</h1><table class='facts'>{rows}</table>"
        f"<p class='small'>detect options: {opts}</p><p class='small'>{direction}</p></section>"
    )


def _missed_section(view: _View, root: Path, config: ReportConfig, reporter: Reporter) -> str:
    """With a truth CSV: the wrong labels that were not flagged, as a gallery (same cap as the flagged)."""
    if view.truth is None:
        return ""
    missed = view.missed_order()
    shown = missed[: config.max_tiles]
    thumbs = _thumbnails(view.paths[shown], root, config.thumb_px, reporter)
    return (
        f"<section id='missed'><h2>Missed wrong labels (<span id='n-missed'>{len(missed):,}</span>; lowest "
        f"p_clean first, at most {config.max_tiles:,} shown)</h2>{_gallery(view, shown, thumbs, 'missed')}"
        "</section>"
    )


def _per_class(view: _View, shown: np.ndarray) -> pd.DataFrame:
    """Per given label: images, flagged, flagged share, estimated noise rate (mean 1 - p_clean), not shown."""
    k = len(view.names)
    scored = view.scored
    n = np.bincount(view.given[scored], minlength=k)
    flagged = np.bincount(view.given[view.flagged], minlength=k)
    expected = np.bincount(view.given[scored], weights=1.0 - view.p_clean[scored], minlength=k)
    on_page = np.bincount(view.given[shown], minlength=k)
    return pd.DataFrame(
        {
            "class": view.names,
            "images": n,
            "flagged": flagged,
            "flagged_share": flagged / np.maximum(n, 1),
            "noise_estimate": expected / np.maximum(n, 1),
            "not_shown": flagged - on_page,
        }
    )


def _class_section(view: _View, shown: np.ndarray) -> str:
    table = _per_class(view, shown).sort_values("flagged_share", ascending=False, kind="stable")
    top = table.head(MAX_CHART_CLASSES).sort_index()
    note = f" (the {len(top)} classes with the highest flagged share)" if len(top) < len(table) else ""
    chart = report_charts.class_bars(list(top["class"]), top["flagged_share"], top["noise_estimate"])
    head = "<tr><th>class</th><th>images</th><th>flagged</th><th>share</th><th>est. noise</th>"
    head += "<th>not shown</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(str(r['class']))}</td><td>{r['images']:,}</td><td>{r['flagged']:,}</td>"
        f"<td>{r['flagged_share']:.1%}</td><td>{r['noise_estimate']:.1%}</td><td>{r['not_shown']:,}</td></tr>"
        for r in table.to_dict("records")
    )
    return (
        f"<section id='classes'><h2>Per class (given label){note}</h2>"
        "<p class='small'>Flagged share: flagged images / scored images of the class. Estimated noise rate: "
        "the mean of 1 - p_clean over the class, what the model expects to be wrong.</p>"
        f"<div class='chart'>{chart}</div><table class='classes'>{head}{rows}</table></section>"
    )


def _charts_section(view: _View) -> str:
    k = len(view.names)
    changed = view.flagged & (view.suggested >= 0) & (view.suggested != view.given)
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (view.given[changed], view.suggested[changed]), 1)
    keep = np.argsort(-(counts.sum(0) + counts.sum(1)), kind="stable")[:MAX_CHART_CLASSES]
    keep.sort()
    note = f" ({len(keep)} of {k} classes: those most involved)" if len(keep) < k else ""
    heat = report_charts.confusion_heatmap([view.names[i] for i in keep], counts[np.ix_(keep, keep)])
    hist = report_charts.p_clean_histogram(
        view.p_clean[view.flagged], view.p_clean[view.scored & ~view.flagged]
    )
    return (
        f"<section id='charts'><h2>Given → suggested label, flagged images{note}</h2>"
        f"<div class='chart'>{heat}</div><h2>p_clean of flagged and kept images</h2>"
        f"<div class='chart'>{hist}</div></section>"
    )


def _truth_section(view: _View) -> str:
    if view.truth is None:
        return ""
    known = view.scored & (view.truth >= 0)
    m = flag_metrics(view.flagged[known], (view.truth != view.given)[known])
    return (
        "<section id='truth'><h2>Against the truth CSV</h2><p>"
        f"{m['n']:,} rows with a verified label: caught <b>{m['n_caught']:,}</b> of the {m['n_wrong']:,} "
        f"wrong labels; precision <b id='precision'>{m['precision']:.3f}</b>, recall <b>{m['recall']:.3f}"
        f"</b>, F1 <b>{m['f1']:.3f}</b>. The wrong labels that were missed are at the end of the page.</p>"
        "</section>"
    )


def _gallery_section(view: _View, shown: np.ndarray, thumbs: list[str | None]) -> str:
    def options(codes: np.ndarray) -> str:
        counts = np.bincount(codes[codes >= 0], minlength=len(view.names))
        return "".join(
            f"<option value='{k}'>{html.escape(view.names[k])} ({counts[k]:,})</option>"
            for k in np.flatnonzero(counts)
        )

    return (
        "<section id='gallery'><h2>Flagged images, most likely wrong first</h2><div class='filters'>"
        f"<label>given <select id='f-given'><option value=''>all</option>{options(view.given[shown])}"
        "</select></label> <label>suggested <select id='f-suggested'><option value=''>all</option>"
        f"{options(view.suggested[shown])}</select></label> <span id='n-visible'>{len(shown):,}</span> "
        f"tiles match</div>{_gallery(view, shown, thumbs, 'flagged')}</section>"
    )


def _gallery(view: _View, rows: np.ndarray, thumbs: list[str | None], kind: str) -> str:
    """Tiles: image, path, given → suggested label, p_clean and rank; data-* attributes for the filters."""
    tiles = []
    for row, thumb in zip(rows, thumbs, strict=True):
        path = html.escape(str(view.paths[row]))
        image = (
            f"<img src='data:image/jpeg;base64,{thumb}' alt='{path}' loading='lazy'>"
            if thumb
            else "<div class='missing'>image not found</div>"
        )
        given, suggested = view.names[view.given[row]], view.names[view.suggested[row]]
        change = f" → <b>{html.escape(suggested)}</b>" if suggested != given else " (kept)"
        truth = ""
        if view.truth is not None and view.truth[row] >= 0:
            truth = f"<br>truth {html.escape(view.names[view.truth[row]])}"
        tiles.append(
            f"<figure class='tile' data-given='{view.given[row]}' data-suggested='{view.suggested[row]}'>"
            f"{image}<figcaption><code>{path}</code><br>{html.escape(given)}{change}"
            f"<br>p_clean {view.p_clean[row]:.3f} · rank {int(view.rank[row]):,}{truth}"
            "</figcaption></figure>"
        )
    return f"<div class='grid' data-kind='{kind}'>{''.join(tiles)}</div>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body>{body}<script>{script}</script></body></html>
"""

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}.small{color:#666;font-size:12px}
table{border-collapse:collapse}th,td{padding:2px 8px;text-align:left;border-bottom:1px solid #eee}
table.classes td:not(:first-child){text-align:right}.chart svg{max-width:100%;height:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:8px}
.tile{margin:0;padding:6px;border:1px solid #ddd;border-radius:4px;font-size:12px;overflow-wrap:anywhere}
.tile img,.missing{width:100%;aspect-ratio:1;object-fit:contain;background:#f4f4f4;image-rendering:pixelated}
.missing{display:flex;align-items:center;justify-content:center;color:#a00}.tile[hidden]{display:none}
.filters{margin:.5em 0 1em}
"""

_SCRIPT = """
(function () {
  var given = document.getElementById('f-given'), suggested = document.getElementById('f-suggested');
  var tiles = document.querySelectorAll('.grid[data-kind=flagged] .tile');
  function apply() {
    var n = 0;
    tiles.forEach(function (t) {
      var ok = (!given.value || t.dataset.given === given.value) &&
               (!suggested.value || t.dataset.suggested === suggested.value);
      t.hidden = !ok; if (ok) n++;
    });
    document.getElementById('n-visible').textContent = n.toLocaleString('en');
  }
  given.addEventListener('change', apply); suggested.addEventListener('change', apply);
  apply();
  document.body.dataset.ready = 'yes';
})();
"""
