"""The decode-once cache on disk: reused while the images are unchanged, rebuilt when they change or it is
damaged, and never a reason for a run to fail."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LogLines, stage_configs, write_image

from deft_clean import image_cache
from deft_clean.config import DataConfig
from deft_clean.data import load_manifest
from deft_clean.detect import detect
from deft_clean.image_cache import build_image_cache
from deft_clean.progress import SilentReporter


class Decodes:
    """Counts the images decoded (``image_cache.decode_square`` wrapped)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, real = 0, image_cache.decode_square

        def counted(path: Path, size: int) -> np.ndarray:
            self.count += 1
            return real(path, size)

        monkeypatch.setattr(image_cache, "decode_square", counted)


def _load(folder: Path, cache: Path, log: LogLines | None = None, **options: object):
    config = DataConfig(image_cache=str(cache), **options)  # type: ignore[arg-type]
    return load_manifest(folder, config=config, image_size=8, reporter=log or SilentReporter())


def test_second_load_reads_the_cache_and_says_so(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    decodes, first, second = Decodes(monkeypatch), LogLines(), LogLines()
    before = _load(image_folder, tmp_path / "c", first)
    assert decodes.count == 6
    (file,) = (tmp_path / "c").iterdir()
    assert first.lines == [f"decoded 6 images, cached at {file}"]
    again = _load(image_folder, tmp_path / "c", second)
    assert decodes.count == 6  # nothing decoded the second time
    assert second.lines == [f"reused decoded images from {file}"]
    assert again.images is not None and before.images is not None
    assert torch.equal(again.images, before.images) and again.images.sum() > 0


def test_changed_added_or_removed_image_decodes_again(
    image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    decodes = Decodes(monkeypatch)
    _load(image_folder, tmp_path / "c")
    touched = image_folder / "cat" / "c1.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    _load(image_folder, tmp_path / "c")
    assert decodes.count == 12
    write_image(touched, seed=99)  # new pixels: the cache must give them, not the old ones
    replaced = _load(image_folder, tmp_path / "c")
    assert replaced.images is not None
    assert torch.equal(replaced.images[1], image_cache.build_image_cache([touched], 8, in_memory=True)[0])
    write_image(image_folder / "dog" / "d9.jpg", seed=5)
    assert len(_load(image_folder, tmp_path / "c")) == 7
    (image_folder / "dog" / "d9.jpg").unlink()
    (image_folder / "dog" / "d2.jpg").unlink()
    assert len(_load(image_folder, tmp_path / "c")) == 5
    assert decodes.count == 12 + 6 + 1 + 7 + 5  # (the uncached single image above decoded 1)
    assert len(list((tmp_path / "c").glob("*.u8"))) == 3  # one per image list and size: 6, 7 and 5 images


@pytest.mark.parametrize("damage", ["flip a pixel byte", "truncate", "garbage header"])
def test_damaged_cache_is_ignored_with_a_notice_and_rebuilt(
    image_folder: Path, tmp_path: Path, monkeypatch, damage: str
) -> None:
    good = _load(image_folder, tmp_path / "c").images
    (file,) = (tmp_path / "c").iterdir()
    data = bytearray(file.read_bytes())
    if damage == "flip a pixel byte":
        data[-5] ^= 0xFF
    elif damage == "truncate":
        data = data[:-100]
    else:
        data[:20] = b"x" * 20
    file.write_bytes(bytes(data))
    decodes, log = Decodes(monkeypatch), LogLines()
    rebuilt = _load(image_folder, tmp_path / "c", log)
    assert decodes.count == 6 and rebuilt.images is not None and torch.equal(rebuilt.images, good)
    assert log.lines[0].startswith(f"ignored the damaged decoded-image cache {file}")
    assert log.lines[1] == f"decoded 6 images, cached at {file}"
    assert _load(image_folder, tmp_path / "c", log).images is not None
    assert log.lines[2] == f"reused decoded images from {file}"


def test_off_keeps_nothing_and_an_unwritable_folder_is_a_notice(
    image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("DEFT_CLEAN_CACHE", str(tmp_path / "home"))
    decodes = Decodes(monkeypatch)
    for _ in range(2):
        load_manifest(image_folder, config=DataConfig(image_cache="off"), image_size=8)
    assert decodes.count == 12 and not (tmp_path / "home").exists()
    load_manifest(image_folder, image_size=8)  # 'auto': $DEFT_CLEAN_CACHE/decoded
    assert len(list((tmp_path / "home" / "decoded").glob("*-8px-*.u8"))) == 1
    (tmp_path / "a-file").write_text("")
    log = LogLines()
    manifest = _load(image_folder, tmp_path / "a-file" / "cache", log)
    assert manifest.images is not None and manifest.images.sum() > 0
    assert log.lines[0].startswith(f"not keeping the decoded images at {tmp_path / 'a-file' / 'cache'}")


def test_skipped_unreadable_rows_are_checked_again_on_a_hit(
    image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    (image_folder / "dog" / "d1.jpg").write_bytes(b"broken")
    first = _load(image_folder, tmp_path / "c", on_bad_image="skip")
    decodes, log = Decodes(monkeypatch), LogLines()
    second = _load(image_folder, tmp_path / "c", log, on_bad_image="skip")
    assert decodes.count == 1  # only the row the cache holds as unreadable
    assert second.readable.tolist() == first.readable.tolist() == [True] * 4 + [False, True]
    assert any(line.startswith("skipped (status=unreadable)") for line in log.lines)


def test_memmap_cache_matches_ram_and_is_reused(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    files = load_manifest(image_folder).files()
    readable = np.array([True, False, True, True, True, True])
    in_ram = build_image_cache(files, 8, readable=readable, in_memory=True)
    on_disk = build_image_cache(files, 8, readable=readable, in_memory=False, cache_dir=tmp_path / "c")
    assert torch.equal(in_ram, on_disk) and in_ram[1].sum() == 0
    (file,) = (tmp_path / "c").iterdir()
    decodes = Decodes(monkeypatch)
    assert torch.equal(
        build_image_cache(files, 8, readable=readable, in_memory=False, cache_dir=file.parent), in_ram
    )
    assert decodes.count == 0
    assert torch.equal(
        build_image_cache(files, 8, readable=None, in_memory=True, cache_dir=file.parent)[0], in_ram[0]
    )
    assert decodes.count == 6  # another readable mask is not this cache


def test_flags_identical_between_the_decoding_and_the_reusing_run(tmp_path: Path, monkeypatch) -> None:
    from test_detect import QUICK, make_dataset

    root, labels, _ = make_dataset(tmp_path / "d", per_class=6)
    decodes = Decodes(monkeypatch)
    runs = [
        detect(root, labels, out=tmp_path / f"r{i}.parquet", **stage_configs("detect", **QUICK)).frame
        for i in range(2)
    ]
    assert decodes.count == 24  # the first run only
    pd.testing.assert_frame_equal(runs[0], runs[1])


def test_too_big_for_ram_the_second_run_maps_the_cache_and_decodes_nothing(
    image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    from deft_clean import data, validation

    monkeypatch.setattr(data, "fits_in_ram", lambda shape: False)
    monkeypatch.setattr(image_cache, "fits_in_ram", lambda shape: False)
    checks = []
    real_verify = validation.verify_image
    monkeypatch.setattr(validation, "verify_image", lambda path: checks.append(path) or real_verify(path))
    decodes = Decodes(monkeypatch)
    first = _load(image_folder, tmp_path / "c")
    assert first.images is None and len(checks) == 6  # validation decoded cheaply, keeping nothing
    pixels = first.decode(8)
    assert decodes.count == 6 and len(list((tmp_path / "c").glob("*.u8"))) == 1  # decoded into the cache file
    second = _load(image_folder, tmp_path / "c")
    assert len(checks) == 6 and decodes.count == 6  # the second run decodes nothing, not even cheaply
    assert second.images is not None and torch.equal(second.images, pixels)
    assert second.decode(8) is second.images
