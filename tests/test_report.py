"""The HTML report: content from the results file, the tile cap and its counts, and a real browser's view."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deft_clean.cli import app
from deft_clean.config import ReportConfig
from deft_clean.errors import ConfigError, DeftCleanError
from deft_clean.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _tiles(page: str, kind: str = "flagged") -> list[str]:
    grid = re.search(rf"<div class='grid' data-kind='{kind}'>(.*?)</div></section>", page, re.S)
    assert grid is not None, f"no {kind} gallery"
    return re.findall(r"<figure class='tile'.*?</figure>", grid.group(1), re.S)


def test_report_shows_flagged_rows_in_rank_order_with_labels_and_scores(flags_case) -> None:
    report = build_report(flags_case.flags, flags_case.flags.with_name("r.html"))
    page = report.path.read_text()
    tiles = _tiles(page)
    assert (report.n_rows, report.n_flagged, report.n_shown, report.n_missing_images) == (30, 8, 8, 0)
    assert "img/00.png" in tiles[0] and "img/07.png" in tiles[-1]  # noise_rank 1 first
    assert "Cat → <b>Dog</b>" in tiles[0] and "p_clean 0.050 · rank 1" in tiles[0]
    assert all("src='data:image/jpeg;base64," in t for t in tiles)
    assert page.count("<svg") == 3  # class bars, heat map, histogram: inline, no external resources
    assert not re.search(r"""(src|href)=['"]https?:""", page)
    assert "<span id='n-flagged'>8</span>" in page and "<span id='n-hidden'>0</span>" in page


def test_report_caps_tiles_and_counts_what_is_not_shown(flags_case) -> None:
    report = build_report(flags_case.flags, config=ReportConfig(max_tiles=3))
    page = report.path.read_text()
    assert report.path == flags_case.flags.with_suffix(".html")
    assert len(_tiles(page)) == 3 and report.n_shown == 3
    assert "<span id='n-shown'>3</span>" in page and "<span id='n-hidden'>5</span>" in page
    # per-class "not shown": rows 0-7 have given labels cat,dog,owl,cat,dog,owl,cat,dog; rows 0-2 shown
    rows = dict(re.findall(r"<tr><td>(\w+)</td>(?:<td>[^<]*</td>){4}<td>(\d+)</td></tr>", page))
    assert rows == {"Cat": "2", "Dog": "2", "Owl": "1"}


def test_report_with_truth_has_metrics_and_the_missed_wrong_label(flags_case) -> None:
    report = build_report(flags_case.flags, truth_csv=flags_case.truth_csv)
    page = report.path.read_text()
    # 7 wrong (rows 0-5 and 20); 8 flagged, 6 of them wrong: precision 0.750, recall 6/7
    assert "caught <b>6</b> of the 7" in page and "<b id='precision'>0.750</b>" in page
    missed = _tiles(page, "missed")
    assert len(missed) == 1 and "img/20.png" in missed[0] and "(kept)" in missed[0]


def test_missing_images_become_placeholders_and_are_counted(flags_case) -> None:
    (flags_case.root / "img" / "00.png").unlink()
    (flags_case.root / "img" / "01.png").write_bytes(b"not an image")
    report = build_report(flags_case.flags)
    assert report.n_missing_images == 2
    assert report.path.read_text().count("<div class='missing'>image not found</div>") == 2


def test_report_refuses_a_missing_image_folder_and_bad_options(flags_case, tmp_path) -> None:
    with pytest.raises(DeftCleanError, match="Image folder not found.*--data-dir"):
        build_report(flags_case.flags, data_dir=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="--max-tiles -1 is invalid. Use a value >= 0"):
        ReportConfig(max_tiles=-1)
    with pytest.raises(ConfigError, match="--thumb-px 4 is invalid. Use a value between 16 and 512"):
        ReportConfig(thumb_px=4)


def test_cli_report_writes_the_page_and_renders_errors(flags_case, tmp_path) -> None:
    out = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["report", str(flags_case.flags), "--out", str(out), "--max-tiles", "2"])
    assert result.exit_code == 0, result.output
    assert len(_tiles(out.read_text())) == 2
    result = CliRunner().invoke(app, ["report", str(tmp_path / "none.parquet")])
    assert result.exit_code == 1 and "Results file not found" in result.output


# Runs after the report's own script: pick the first given label in the filter and record what is visible.
_PROBE = """<script>
var s = document.getElementById('f-given');
s.value = s.options[1].value; s.dispatchEvent(new Event('change'));
var want = document.querySelectorAll('.grid[data-kind=flagged] .tile[data-given="' + s.value + '"]').length;
var seen = document.querySelectorAll('.grid[data-kind=flagged] .tile:not([hidden])').length;
document.body.dataset.probe = want + '/' + seen + '/' + document.getElementById('n-visible').textContent;
</script>"""
_TRAP = """<script>window.__errors = [];
window.addEventListener('error', function (e) { document.documentElement.dataset.jsError = e.message; });
console.error = function (m) { document.documentElement.dataset.consoleError = String(m); };</script>"""


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}"]
    args += ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(flags_case, tmp_path) -> None:
    report = build_report(flags_case.flags, truth_csv=flags_case.truth_csv, config=ReportConfig(max_tiles=6))
    page = report.path.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + _TRAP, 1).replace("</body>", _PROBE + "</body>"))
    run = _chromium(probed.as_uri(), tmp_path / "profile", "--dump-dom")
    dom = run.stdout
    assert run.returncode == 0 and "<body" in dom, run.stderr[-2000:]
    assert 'data-ready="yes"' in dom  # the report's script ran to the end
    assert len(re.findall(r'<figure class="tile"', dom)) == 6 + 1  # 6 flagged + 1 missed
    assert re.search(r'<span id="n-hidden">2</span>', dom)
    want, seen, counter = re.search(r'data-probe="(\d+)/(\d+)/(\d+)"', dom).groups()
    assert want == seen == counter and 0 < int(want) < 6  # the label filter hides the other tiles
    assert "data-js-error" not in dom and "data-console-error" not in dom
    assert not re.search(r"CONSOLE.*(Uncaught|Error)", run.stderr)

    shot = Path(os.environ.get("DEFT_SCREENSHOT_DIR", tmp_path)) / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    run = _chromium(
        report.path.as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1600"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        assert np.asarray(image.convert("L")).std() > 10  # something was drawn, not a blank page
