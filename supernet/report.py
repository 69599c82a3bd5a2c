"""Figures of the project, the supernet commands and `python -m benchmarks` (one helper writes every PNG
atomically), the training-curve plot, the summary lines
and the per-width table of slimmable networks."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(figure, path: str) -> None:
    """Lay out, write atomically as PNG, and close."""
    from .checkpoint import atomic_write

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write(path, buffer.getvalue())


SUPERNET_LOSSES = {"train_ce": "max subnet cross-entropy", "train_kd": "KD loss (mean over students)"}
SUPERNET_ACCURACIES = {"val_top1_max": "max subnet", "val_top1_min": "min subnet"}


def plot_curves(history: List[Dict[str, float]], path: str, losses: Dict[str, str] = SUPERNET_LOSSES,
                accuracies: Dict[str, str] = SUPERNET_ACCURACIES) -> None:
    """Training losses (log scale) and validation accuracies per epoch, from the run's history."""
    if not history:
        return
    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in losses.items():
        loss_axis.plot(epochs, [max(r[name], 1e-12) for r in history], label=label)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_yscale("log")
    loss_axis.legend()
    loss_axis.set_title("training losses")
    for name, label in accuracies.items():
        accuracy_axis.plot(epochs, [r[name] for r in history], marker="o", label=label)
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("validation top-1 (%), BN recalibrated")
    accuracy_axis.legend()
    accuracy_axis.set_title("validation accuracy")
    save_figure(figure, path)


def summary_lines(summary: Dict[str, object], out: str) -> List[str]:
    return [
        f"max subnet test top-1: {summary['test_top1_max']:.1f}%",
        f"min subnet test top-1: {summary['test_top1_min']:.1f}%",
        f"steps: {summary['step']} ({summary['skipped_steps']} skipped for non-finite loss)",
        f"checkpoint: {os.path.join(out, 'checkpoint.pt')}",
        f"config: {os.path.join(out, 'config.yaml')}",
        f"metrics: {os.path.join(out, 'metrics.csv')} and metrics.jsonl, per step: steps.jsonl",
        f"curves: {os.path.join(out, 'curves.png')}",
    ]


WIDTH_COLUMNS = ("width", "mflops", "params", "top1")


def width_table_lines(rows: List[Dict[str, float]], split: str) -> List[str]:
    """One row per width, as the paper's Table 1: width, MFLOPs, parameters, calibrated top-1."""
    lines = [f"{'width':>6}  {'MFLOPs':>8}  {'params (M)':>10}  {split + ' top-1':>11}"]
    lines += [f"{row['width']:>6.2f}  {row['mflops']:>8.2f}  {row['params'] / 1e6:>10.3f}  {row['top1']:>10.2f}%"
              for row in rows]
    return lines


def write_width_table(rows: List[Dict[str, float]], prefix: str, title: str) -> List[str]:
    """`prefix`.json, .csv and .png (top-1 against MFLOPs, each point labelled with its width)."""
    from .checkpoint import atomic_write

    atomic_write(prefix + ".json", json.dumps(rows, indent=2).encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(WIDTH_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(prefix + ".csv", text.getvalue().encode())
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([row["mflops"] for row in rows], [row["top1"] for row in rows], marker="o")
    for row in rows[::max(1, -(-len(rows) // 8))]:  # at most 8 labels, so they stay legible
        axis.annotate(f"{row['width']:.2f}x", (row["mflops"], row["top1"]), fontsize=7, xytext=(3, -9),
                      textcoords="offset points")
    axis.set_xlabel("MFLOPs (multiply-adds)")
    axis.set_ylabel("top-1 (%), BN recalibrated per width")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    save_figure(figure, prefix + ".png")
    return [prefix + suffix for suffix in (".json", ".csv", ".png")]
