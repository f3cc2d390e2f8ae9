"""Exports: corrected CSV + review.csv, Label Studio tasks (structure), and the review round trip."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
from typer.testing import CliRunner

from deft_clean.cli import app
from deft_clean.config import DataConfig, ExportConfig
from deft_clean.data import load_manifest
from deft_clean.errors import ConfigError, DataError, DeftCleanError
from deft_clean.export import (
    export_csv,
    export_label_studio,
    export_labels,
    import_review,
)


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_csv_applies_confident_suggestions_only_and_keeps_the_users_columns(flags_case, tmp_path) -> None:
    summary = export_csv(flags_case.flags, tmp_path / "out")
    before, after = _csv(flags_case.labels_csv), _csv(tmp_path / "out" / "corrected.csv")
    assert (
        list(after.columns) == ["split", "path", "label"]
        and after["path"].tolist() == before["path"].tolist()
    )
    changed = after.index[after["label"] != before["label"]].tolist()
    assert changed == [0, 1, 2, 3]  # flagged with predicted_prob 0.95; rows 4-7 have 0.5
    assert after["label"][:4].tolist() == ["dog", "owl", "cat", "dog"]  # the next class, as planted
    assert (after["split"] == "train").all()
    review = _csv(tmp_path / "out" / "review.csv")
    assert review["path"].tolist() == [f"img/{i:02d}.png" for i in range(4, 8)]  # by noise_rank
    assert review.columns.tolist()[:3] == ["path", "given_label", "suggested_label"]
    assert (summary.n_rows, summary.n_flagged, summary.n_changed, summary.n_for_review) == (30, 8, 4, 4)


@pytest.mark.parametrize(("accept_above", "n_changed"), [(1.0, 0), (0.5, 8), (0.0, 8)])
def test_accept_above_sets_how_many_suggestions_are_applied(flags_case, tmp_path, accept_above, n_changed):
    summary = export_csv(flags_case.flags, tmp_path, config=ExportConfig(accept_above=accept_above))
    assert summary.n_changed == n_changed and summary.n_for_review == 8 - n_changed


def test_corrected_csv_is_an_ordinary_labels_csv(flags_case, tmp_path) -> None:
    export_csv(flags_case.flags, tmp_path)
    manifest = load_manifest(flags_case.root, tmp_path / "corrected.csv")
    assert manifest.class_ids == ["cat", "dog", "owl"] and manifest.labels[:4].tolist() == [1, 2, 0, 1]


def test_csv_refuses_a_labels_csv_changed_since_detect(flags_case, tmp_path) -> None:
    flags_case.labels_csv.write_text(flags_case.labels_csv.read_text() + "train,img/00.png,cat\n")
    with pytest.raises(DeftCleanError, match="changed since detect"):
        export_csv(flags_case.flags, tmp_path)


def test_options_are_checked(flags_case) -> None:
    with pytest.raises(ConfigError, match=r"--accept-above 1.5 is invalid. Use a value in \[0, 1\]"):
        ExportConfig(accept_above=1.5)
    with pytest.raises(ConfigError, match="--to 'xlsx' is invalid. Use a value 'csv' or 'label-studio'"):
        ExportConfig(to="xlsx")


def test_label_studio_tasks_follow_the_documented_format(flags_case, tmp_path) -> None:
    """Label Studio's task format for pre-annotations: ``data`` holds the value the labeling config's
    object tag reads (``$image``); each prediction has ``model_version``, ``score`` and a ``result`` list
    whose items name the control tag (``from_name``) and the object tag (``to_name``), ``type: choices``
    and ``value.choices`` from the config's Choice values."""
    export_labels(
        flags_case.flags, tmp_path, config=ExportConfig(to="label-studio", image_url_prefix="/files/")
    )
    tasks = json.loads((tmp_path / "label-studio-tasks.json").read_text())
    view = ET.fromstring((tmp_path / "label-studio-config.xml").read_text())
    image, choices = view.find("Image"), view.find("Choices")
    values = [c.get("value") for c in choices.findall("Choice")]
    assert values == ["cat", "dog", "owl"] and [c.get("hint") for c in choices.findall("Choice")][0] == "Cat"
    assert choices.get("toName") == image.get("name") and choices.get("choice") == "single"
    assert image.get("value") == "$" + "image"
    assert isinstance(tasks, list) and len(tasks) == 8
    frame = flags_case.frame
    for rank, task in enumerate(tasks, start=1):
        data, (prediction,) = task["data"], task["predictions"]
        row = frame.index[frame["path"] == data["path"]][0]
        assert data["image"] == "/files/" + quote(data["path"]) and data["noise_rank"] == rank
        assert set(prediction) == {"model_version", "score", "result"}
        assert prediction["model_version"].startswith("deft-clean ")
        assert prediction["score"] == pytest.approx(float(frame["p_clean"][row]))
        (result,) = prediction["result"]
        assert result["from_name"] == choices.get("name") and result["to_name"] == image.get("name")
        assert result["type"] == "choices" and result["value"]["choices"] == [frame["suggested_label"][row]]
        assert data["given_label"] == frame["given_label"][row] and data["given_label"] in values


def _reviewed(tasks: list[dict], decisions: dict[int, list[dict]]) -> list[dict]:
    """Label Studio's JSON export of ``tasks``: annotations per task index (copied from the prediction)."""
    out = []
    for i, task in enumerate(copy.deepcopy(tasks)):
        task["id"] = i + 1
        task["annotations"] = decisions.get(i, [])
        out.append(task)
    return out


def _annotation(
    task: dict, choice: str, *, cancelled: bool = False, at: str = "2026-01-01T00:00:00Z"
) -> dict:
    result = copy.deepcopy(task["predictions"][0]["result"])
    result[0]["value"]["choices"] = [choice]
    return {"result": result, "was_cancelled": cancelled, "updated_at": at}


def test_review_round_trip_applies_decisions_and_leaves_everything_else(flags_case, tmp_path) -> None:
    export_label_studio(flags_case.flags, tmp_path)
    tasks = json.loads((tmp_path / "label-studio-tasks.json").read_text())
    decisions = {
        0: [_annotation(tasks[0], tasks[0]["predictions"][0]["result"][0]["value"]["choices"][0])],  # accept
        1: [_annotation(tasks[1], tasks[1]["data"]["given_label"])],  # reject: keep the given label
        2: [_annotation(tasks[2], "owl", cancelled=True)],  # skipped: no change
        3: [  # two reviews: the latest wins
            _annotation(tasks[3], "owl", at="2026-01-02T00:00:00Z"),
            _annotation(tasks[3], "cat", at="2026-01-01T00:00:00Z"),
        ],
    }
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_reviewed(tasks, decisions)))
    summary = import_review(export, flags_case.labels_csv, tmp_path / "reviewed.csv")
    before, after = _csv(flags_case.labels_csv), _csv(tmp_path / "reviewed.csv")
    assert list(after.columns) == list(before.columns) and len(after) == len(before)
    changed = {after["path"][i]: after["label"][i] for i in after.index[after["label"] != before["label"]]}
    assert changed == {"img/00.png": "dog", "img/03.png": "owl"}
    assert (summary.n_flagged, summary.n_changed) == (3, 2)  # tasks 0, 1, 3 decided; 2 skipped


def test_review_json_min_export_is_read_too(flags_case, tmp_path) -> None:
    rows = [{"id": 7, "image": "/x", "path": "img/05.png", "label": "cat", "annotator": 1}]
    export = tmp_path / "min.json"
    export.write_text(json.dumps(rows))
    import_review(export, flags_case.labels_csv, tmp_path / "reviewed.csv")
    assert _csv(tmp_path / "reviewed.csv")["label"][5] == "cat"


def test_review_names_every_task_that_does_not_fit_the_csv(flags_case, tmp_path) -> None:
    rows = [{"path": "img/99.png", "label": "cat"}, {"path": "img/01.png", "label": "lion"}]
    export = tmp_path / "bad.json"
    export.write_text(json.dumps(rows))
    with pytest.raises(DataError) as caught:
        import_review(export, flags_case.labels_csv, tmp_path / "out.csv")
    messages = [str(p) for p in caught.value.problems]
    assert "path 'img/99.png' is not in" in messages[0] and "label 'lion' is unknown" in messages[1]
    assert not (tmp_path / "out.csv").exists()
    export.write_text("{not json")
    with pytest.raises(DeftCleanError, match="is not JSON"):
        import_review(export, flags_case.labels_csv, tmp_path / "out.csv")


def test_cli_export_and_import_review(flags_case, tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(flags_case.flags), "--accept-above", "0.4"])
    assert result.exit_code == 0, result.output
    assert len(_csv(flags_case.flags.parent / "review.csv")) == 0  # every suggestion accepted at 0.4
    out = tmp_path / "ls"
    result = runner.invoke(app, ["export", str(flags_case.flags), "--to", "label-studio", "--out", str(out)])
    assert result.exit_code == 0 and len(json.loads((out / "label-studio-tasks.json").read_text())) == 8
    review = tmp_path / "r.json"
    review.write_text(json.dumps([{"path": "img/02.png", "label": "cat"}]))
    result = runner.invoke(
        app, ["import-review", str(review), str(flags_case.labels_csv), "--out", str(tmp_path / "o.csv")]
    )
    assert result.exit_code == 0 and _csv(tmp_path / "o.csv")["label"][2] == "cat"
    result = runner.invoke(app, ["export", str(flags_case.flags), "--to", "xlsx"])
    assert result.exit_code == 1 and "--to 'xlsx' is invalid" in result.output


def test_imagefolder_results_export_a_path_label_csv(image_folder, tmp_path) -> None:
    from deft_clean.results import base_frame, run_metadata, write_results

    manifest = load_manifest(image_folder, config=DataConfig())
    frame = base_frame(manifest)
    frame["is_noisy"] = pd.array([True] + [False] * 5, dtype="boolean")
    frame["predicted_label"] = ["dog"] + list(frame["given_label"][1:])
    frame["predicted_prob"] = [0.99] * 6
    frame["suggested_label"] = frame["predicted_label"]
    frame["p_clean"] = [0.1] + [0.9] * 5
    frame["noise_rank"] = pd.array([1, 2, 3, 4, 5, 6], dtype="Int64")
    flags = write_results(frame, tmp_path / "f.parquet", metadata=run_metadata(manifest=manifest, configs={}))
    export_csv(flags, tmp_path)
    out = _csv(tmp_path / "corrected.csv")
    assert out.columns.tolist() == ["path", "label"] and out["label"].tolist() == [
        "dog",
        "cat",
        "cat",
        "dog",
        "dog",
        "dog",
    ]
