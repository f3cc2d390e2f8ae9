"""Detector throughput: the compute ceiling against the end-to-end ``detect`` run.

(a) ceiling: DeFT training steps on one batch that already sits on the device (no decoding, no host
    copies): what the model and optimizer alone allow, for the same backbone, tuning and batch size;
(b) end to end: ``deft_clean.detect`` on N JPEG files, from decoding to the written Parquet file; the
    training epochs' images/s come from the run's own metadata.

The goal is (b) ≥ 70% of (a). Both use only deft-clean's public functions (``detect``, and for the
ceiling ``training.train_detector`` on images staged by ``runtime.StagedImages``). Images are synthetic
(speed does not depend on pixel values, nor on weight values, so random-weight architectures are
fine); everything is written under ``--workdir`` (default: the system temp folder), the record also
to ``--json`` when given::

    python -m benchmarks.throughput --model ViT-B-16 --n 50000 --epochs 2 --device cuda

``--ceiling-batches 256`` adds ceilings at other batch sizes; the default batch is timed with cuDNN
autotuning off and on (before/after of ``runtime.cuda_autotune``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deft_clean.backbone import load_backbone_on
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig
from deft_clean.deft_model import DeftModel
from deft_clean.detect import detect
from deft_clean.runtime import StagedImages
from deft_clean.training import LabelledImages, train_detector


def write_images(root: Path, n: int, *, classes: int = 10, size: int = 32, seed: int = 0) -> Path:
    """N random ``size``² JPEGs under ``root/images`` and a ``labels.csv``; returns the CSV path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)

    def one(i: int) -> None:
        pixels = np.random.default_rng(seed + i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
        (root / "images" / f"{i}.jpg").write_bytes(buffer.getvalue())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    csv = root / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"images/{i}.jpg,c{labels[i]}\n" for i in range(n)))
    return csv


def ceiling(
    backbone_config: BackboneConfig, config: DetectConfig, *, classes: int, steps: int, autotune: bool = True
) -> float:
    """Images/s of training steps on one batch resident on the device (augmentation included): the
    last epoch of ``train_detector`` over ``steps`` batches that all read the same staged images.

    ``autotune``: cuDNN kernel autotuning on (what ``detect`` uses) or off (the figure before it).
    """
    torch.manual_seed(0)
    backbone, device = load_backbone_on(backbone_config)
    config, _ = config.resolved(cuda=device.type == "cuda", rows=config.batch_size * steps)  # 'auto' values
    size, batch = backbone.image_size, config.batch_size
    cache = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    rows = np.arange(batch * steps) % batch  # every step reads the same resident batch
    images = StagedImages(cache, rows, mean=backbone.mean, std=backbone.std, size=size, device=device)
    samples = LabelledImages(images, rows % classes)
    net = DeftModel(backbone, [f"class {k}" for k in range(classes)], config)
    timed = dataclasses.replace(config, epochs=2, warmup_epochs=1)  # epoch 1 warms kernels and allocator
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = autotune
    try:
        return train_detector(net, samples, timed)[-1]["img_s"]
    finally:
        torch.backends.cudnn.benchmark = previous


def end_to_end(args: argparse.Namespace, batch_size: int) -> dict:
    """``detect`` on ``args.n`` synthetic JPEGs: per-epoch images/s, wall time and its phases."""
    csv = write_images(args.workdir / f"n{args.n}", args.n)
    started = time.perf_counter()
    result = detect(
        csv.parent, csv, out=args.workdir / "flags.parquet", overwrite=True,
        backbone=BackboneConfig(model=args.model, pretrained=args.pretrained, device=args.device),
        detect=DetectConfig(peft=args.peft, batch_size=batch_size, epochs=args.epochs, warmup_epochs=1,
                            num_workers=args.num_workers),
        data=DataConfig(),
    )  # fmt: skip
    summary = result.summary
    return {
        "n": args.n,
        "epoch_img_s": [round(e["img_s"], 1) for e in summary.epochs],
        "wall_s": round(time.perf_counter() - started, 1),
        "timings": dataclasses.asdict(summary.timings),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="offline")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--peft", default="lora")
    parser.add_argument("--n", type=int, default=50_000, help="Images for the end-to-end run (0: skip it).")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=DetectConfig.batch_size)
    parser.add_argument(
        "--ceiling-batches", default="", help="Extra batch sizes for the ceiling alone, e.g. '256,512'."
    )
    parser.add_argument("--steps", type=int, default=50, help="Timed steps for the ceiling.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=0, help="Decode threads (0: one per core).")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deft-throughput")
    parser.add_argument("--json", type=Path, default=None, help="Write the record here too.")
    args = parser.parse_args()

    backbone_config = BackboneConfig(model=args.model, pretrained=args.pretrained, device=args.device)
    record: dict = {
        "model": args.model, "peft": args.peft, "batch_size": args.batch_size, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }  # fmt: skip
    ceilings = {}
    batches = [args.batch_size] + [int(b) for b in args.ceiling_batches.split(",") if b.strip()]
    for batch in batches:
        config = DetectConfig(peft=args.peft, batch_size=batch, epochs=args.epochs, warmup_epochs=1)
        for autotune in (False, True) if batch == args.batch_size else (True,):
            key = f"b{batch}" + ("" if autotune else "_no_autotune")
            ceilings[key] = round(
                ceiling(backbone_config, config, classes=10, steps=args.steps, autotune=autotune), 1
            )
            print(f"ceiling {args.model} {args.peft} {key}: {ceilings[key]} img/s", flush=True)
    record["ceiling_img_s"] = ceilings
    write_record(record, args.json)  # now and again after the long part: a time limit loses only that
    if args.n > 0:
        e2e = end_to_end(args, args.batch_size)
        e2e["over_ceiling"] = round(max(e2e["epoch_img_s"]) / ceilings[f"b{args.batch_size}"], 3)
        record["end_to_end"] = e2e
        write_record(record, args.json)


def write_record(record: dict, path: Path | None) -> None:
    """Print the record as one JSON line and, with ``--json``, (over)write it to ``path``."""
    print(json.dumps(record), flush=True)
    if path is not None:
        path.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
