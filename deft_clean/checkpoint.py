"""Epoch checkpoints of a training run, so a killed run continues (``--resume``) instead of starting over.

At the end of every epoch, ``detect`` and ``finetune`` write ``<out>.checkpoint`` beside their output
(atomically, under the output's lock): the tensors training changed (prompts, adapters, heads, a tuned
tower, BatchNorm statistics, and frozen weights that moved anyway: peft merges LoRA into
``nn.MultiheadAttention`` weights in place at every forward and the rounding drifts; the rest of the
backbone is rebuilt from its config), the optimizer state, the states of the run's random generators,
the epoch and the history so far, and a key naming the run (:func:`run_key`: configs and input
fingerprint, leaving out options that cannot change the result, such as ``--image-cache``). With
``--resume``, a checkpoint whose key matches is loaded and training continues at the next epoch; the
result is the same as a run that was never interrupted (same tensors, generator states and optimizer
state). The checkpoint is removed once the output is written. A checkpoint of another run (other
options or data) is refused with a message rather than silently mixed in.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deft_clean.config import result_dict
from deft_clean.errors import ConfigError
from deft_clean.files import atomic_file
from deft_clean.progress import Reporter, SilentReporter

FORMAT_VERSION = 2  # 2: riders (state kept outside the model)


def run_key(configs: Iterable[object], fingerprint: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The key naming a run (``detect`` and ``finetune``): its configs' fields that can change the result
    (:func:`deft_clean.config.result_dict`), its input ``fingerprint``, and ``extra`` (finetune's flags
    file and row count)."""
    return {"configs": [result_dict(c) for c in configs], "input": dict(fingerprint), **extra}


def checkpoint_path(out: Path) -> Path:
    """Where the checkpoint of the run writing ``out`` lives: ``<out>.checkpoint``, beside it."""
    return out.with_name(out.name + ".checkpoint")


class Checkpoint:
    """Saves and restores the training state of one run at epoch ends (see the module docstring).

    ``key``: JSON-safe description of the run (configs, input fingerprint); a checkpoint is only
    resumed when its key equals this one. ``resume``: load an existing checkpoint; otherwise one left
    by an earlier run is replaced (with a notice saying ``--resume`` would have continued it).
    ``riders``: objects whose attributes are saved with every epoch and restored in place (detect's
    running average of the scores), so state kept outside the model resumes too.
    """

    def __init__(
        self, path: Path, key: dict[str, Any], *, resume: bool, reporter: Reporter = SilentReporter()
    ) -> None:
        self.path, self.resume, self.reporter = Path(path), resume, reporter
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        self._frozen: dict[str, float] = {}  # sums of the frozen tensors (and buffers) before training
        self._objects: dict[str, weakref.ref] = {}  # the frozen tensor objects before training
        self._watch: set[str] | None = None  # what moved by the first save (None: no save yet)
        self.riders: dict[str, Any] = {}

    def _moved(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors to save: trainable parameters, and frozen parameters or buffers (BatchNorm
        statistics) whose values changed since the start.

        Summing every frozen tensor costs a pass over the whole backbone, so only the first save does
        it; later saves sum only what can move: buffers, tensors whose storage was replaced (peft's
        MultiheadAttention registers new weights at every forward) and those that had moved by the first
        save (whatever a forward changes in place, it changed in the first epoch)."""
        buffers = {name for name, _ in net.named_buffers()}
        moved = {}
        for name, t in _tensors(net):
            check = (self._watch is None or name in self._watch or name in buffers) or _replaced(
                self._objects.get(name), t
            )
            if t.requires_grad or (check and _sum(t) != self._frozen.get(name)):
                moved[name] = t.detach().cpu().clone()
        if self._watch is None:
            self._watch = set(moved)
        return moved

    def restore(
        self, net: nn.Module, optimizer: torch.optim.Optimizer, generators: list[torch.Generator]
    ) -> tuple[int, list[dict[str, float]]]:
        """(epochs already done, their history): from the checkpoint when resuming, else (0, [])."""
        frozen = [(name, t) for name, t in _tensors(net) if not t.requires_grad]
        self._frozen = {name: _sum(t) for name, t in frozen}
        self._objects, self._watch = {name: weakref.ref(t) for name, t in frozen}, None
        if not self.path.is_file():
            if self.resume:
                self.reporter.log(f"no checkpoint at {self.path}; starting from epoch 1", level="warning")
            return 0, []
        if not self.resume:
            self.reporter.log(
                f"{self.path} holds an interrupted run; starting over (pass --resume to continue it)",
                level="warning",
            )
            return 0, []
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("format_version") != FORMAT_VERSION or state.get("key") != self.key:
            raise ConfigError(
                f"The checkpoint {self.path} belongs to another run (other options, backbone or data).",
                hint="Run with the options of the interrupted run, or delete the checkpoint to start over.",
            )
        tensors = dict(_tensors(net))
        with torch.no_grad():
            for name, value in state["params"].items():
                tensors[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        for generator, saved in zip(generators, state["generators"], strict=True):
            generator.set_state(saved)
        for name, values in state["riders"].items():
            vars(self.riders[name]).update(values)
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.reporter.log(f"resumed from {self.path} after epoch {state['epoch']}")
        return int(state["epoch"]), list(state["history"])

    def save(
        self,
        epoch: int,
        history: list[dict[str, float]],
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        generators: list[torch.Generator],
    ) -> None:
        """Write the state after ``epoch`` epochs, atomically (a kill while writing keeps the last one)."""
        state = {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "epoch": epoch,
            "history": history,
            "params": self._moved(net),
            "optimizer": optimizer.state_dict(),
            "generators": [generator.get_state() for generator in generators],
            "riders": {name: dict(vars(rider)) for name, rider in self.riders.items()},
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        with atomic_file(self.path) as partial:
            torch.save(state, partial)

    def remove(self) -> None:
        """Delete the checkpoint (the run finished and its results are written)."""
        self.path.unlink(missing_ok=True)


def _tensors(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``net`` by name."""
    return [*net.named_parameters(), *net.named_buffers()]


def _replaced(before: weakref.ref | None, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is not the object ``before`` referred to (a weak reference: a replaced tensor is
    freed, and its address may be reused, so neither ``id`` nor ``data_ptr`` would tell)."""
    return before is None or before() is not tensor


def _sum(parameter: torch.Tensor) -> float:
    """A checksum of a parameter's values (float64 sum): equal for unchanged values."""
    with torch.no_grad():
        return float(parameter.detach().double().sum())
