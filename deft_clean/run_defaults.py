"""What ``detect`` decides at run time when an option is left to it: the image-tower tuning (``--peft
auto``), the batch size and the learning rate, from the device and the number of rows.

Why these values: a tuned tower keeps the DeFT authors' batch 64 / lr 0.03. A frozen tower trains only
the heads and prompts, and its cost is the number of steps (the text tower runs every step): on 2,000
CIFAR-10 images 4x larger steps (256, lr 0.06) scored as well or better at a quarter of the cost, while
lr 0.12 collapsed at 60% noise; on 300 images 256 left too few steps. So a frozen tower takes about 8
steps per epoch: batch = rows / 8 within [64, 256], lr growing with its square root (docs/benchmarks.md).
"""

from __future__ import annotations

TUNED_BATCH, TUNED_LR = 64, 0.03
FROZEN_MAX_BATCH, FROZEN_STEPS = 256, 8


def decide(
    peft: str, batch_size: int | None, lr: float | None, cuda: bool, rows: int
) -> tuple[str, int, float, list[str]]:
    """The tuning, batch size and lr for the device (``cuda``) and ``rows`` where ``peft`` is 'auto' or
    ``batch_size``/``lr`` are unset, and one line per decision for the run's log. ``--peft auto``: LoRA on
    CUDA; on a CPU a frozen tower, as LoRA trains about 14 times slower there for about the same F1."""
    notes = []
    if peft == "auto":
        peft = "lora" if cuda else "none"
        why = "a GPU is in use" if cuda else "no GPU: LoRA would train ~14x slower on a CPU, same F1"
        notes.append(f"--peft auto chose '{peft}' ({why}; pass --peft to choose).")
    batch = batch_size
    if batch is None:
        frozen = min(max(rows // FROZEN_STEPS, TUNED_BATCH), FROZEN_MAX_BATCH)
        batch = frozen if peft == "none" else TUNED_BATCH
    chosen_lr = lr or round(TUNED_LR * (batch / TUNED_BATCH) ** 0.5, 4)
    if batch_size is None or lr is None:
        tower = "frozen" if peft == "none" else "tuned"
        notes.append(
            f"Batch size {batch}, lr {chosen_lr}: the defaults for a {tower} image tower and {rows} rows."
        )
    return peft, batch, chosen_lr, notes
