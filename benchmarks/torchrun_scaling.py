"""Wall time of one `detect` run in 1 process against N processes under torchrun (issue 14).

Runs the same command line (README command 1's data by default: the bundled Fashion-MNIST example
with the offline backbone) once per process count, each a fresh ``python -m deft_clean detect`` or
``python -m torch.distributed.run --standalone --nproc-per-node N -m deft_clean detect``, and records
the wall time, the run's own timings (from the results file's metadata), the load average before and
after (the machine may be shared), the threads per process (the cores divided among the processes)
and how many flags agree with the 1-process run. It also counts the detector's trainable parameters,
which is what every training step all-reduces (4 bytes each). Prints a markdown table and writes the
record as JSON::

    python -m benchmarks.torchrun_scaling --processes 1 2 --out runs/torchrun-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deft_clean.backbone import load_backbone
from deft_clean.config import BackboneConfig, DetectConfig
from deft_clean.data import load_manifest
from deft_clean.deft_model import DeftModel
from deft_clean.results import read_results

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"


def command(processes: int, data: Path, out: Path, options: list[str]) -> list[str]:
    """The detect command line for ``processes`` processes (plain ``python -m`` for one)."""
    launcher = [sys.executable, "-m", "deft_clean"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(processes), "-m", "deft_clean"]  # fmt: skip
    args = ["detect", str(data), str(data / "labels.csv"), "--classes", str(data / "classes.txt")]
    return [*launcher, *args, "--out", str(out), "--overwrite", *options]


def timed_run(processes: int, data: Path, out: Path, options: list[str], threads: int | None) -> dict:
    """One run: wall time, load averages around it, the run's own timings, its flags. ``threads`` per
    process (default: the cores divided among the processes)."""
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(command(processes, data, out, options), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    frame = read_results(out)
    return {
        "processes": processes,
        "threads_per_process": threads,
        "wall_s": round(wall, 2),
        "load_before": [round(x, 2) for x in before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "timings": frame.attrs["detect"]["timings"],
        "world_size": frame.attrs["world_size"],
        "flags": frame["is_noisy"].fillna(False).to_numpy(dtype=bool).tolist(),
    }


def trainable_parameters(model: str, data: Path, peft: str) -> int:
    """The detector's trainable parameters (prompts, heads, adapters): the all-reduced gradient."""
    manifest = load_manifest(data, data / "labels.csv")
    net = DeftModel(
        load_backbone(BackboneConfig(model=model)), manifest.prompt_names(), DetectConfig(peft=peft)
    )
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=EXAMPLE, help="folder with labels.csv and classes.txt")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--peft", default="none")
    parser.add_argument("--threads", type=int, help="threads per process (default: cores / processes)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more detect options")
    parser.add_argument("--out", type=Path, default=Path("runs/torchrun-scaling.json"))
    args = parser.parse_args()
    options = ["--model", args.model, "--peft", args.peft, "--device", "cpu", *args.extra]
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.processes:
            runs.append(timed_run(n, args.data, Path(folder) / f"flags-{n}.parquet", options, args.threads))
    reference = np.array(runs[0]["flags"])
    params = trainable_parameters(args.model, args.data, args.peft)
    first = runs[0]["processes"]
    print(
        f"| processes | threads each | wall s | speed-up | train s | flags as {first} | load before → after |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        agree = float((np.array(run["flags"]) == reference).mean())
        run["flag_agreement"] = agree
        print(
            f"| {run['processes']} | {run['threads_per_process']} | {run['wall_s']:.1f} | "
            f"{runs[0]['wall_s'] / run['wall_s']:.2f}x | {run['timings']['train_s']:.1f} | {agree:.3f} | "
            f"{run['load_before'][0]:.1f} → {run['load_after'][0]:.1f} |"
        )
    size = f"{params:,} = {4 * params / 1e6:.2f} MB all-reduced a step"
    print(f"trainable parameters ({args.model}, --peft {args.peft}): {size}")
    record = {
        "command": sys.argv, "options": options, "cores": os.cpu_count(), "trainable_parameters": params,
        "allreduce_bytes_per_step": 4 * params, "runs": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
