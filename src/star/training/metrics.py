"""What a run measures and records: a classifier's accuracy over a loader, and the metric rows of
`metrics.csv` and TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from star.training.checkpoint import atomic_write
from star.training.runtime import to_device


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", amp_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of a classifier over (images, labels) batches; a None
    batch (only unreadable images, see `star.build.eval_loader`) counts nothing."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        images, targets = to_device(images, device), to_device(targets, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), topk[:, 0].sum(),
                               topk.any(dim=1).sum(), torch.tensor(targets.shape[0], device=device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    loss, top1, top5, count = totals.tolist()
    if count == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}


# ---------------------------------------------------------------------------- metrics


class MetricsLogger:
    """Appends metric rows to `metrics.csv` (columns grow as new metrics appear) and TensorBoard.

    On resume, rows logged after the checkpoint's step (by a run that died later) are dropped so
    the file reads as one uninterrupted run; a row cut short by a kill is dropped too. The file is
    only ever appended to or replaced whole (`atomic_write`), so a kill never leaves it emptied.
    """

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None):
        self.path = run_dir / "metrics.csv"
        self.fields, self.rows = ["step"], []
        if resume_step is not None and self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # the row being appended when the run died
            reader = csv.DictReader(lines)
            self.fields = list(reader.fieldnames or ["step"])
            self.rows = [r for r in reader if int(r["step"]) <= resume_step]
        self._rewrite()
        purge = 0 if resume_step is None else resume_step + 1  # a fresh start drops a dead run's events too
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a bare GPU image may lack it: keep the CSV
            print("tensorboard is not installed: metrics go to metrics.csv only")
            self.tb = None
        else:
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def _rewrite(self) -> None:
        def write(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.fields)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: repr(float(v)) for k, v in metrics.items()}}
        self.rows.append(row)
        if any(k not in self.fields for k in row):
            self.fields += [k for k in row if k not in self.fields]
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields).writerow(row)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
