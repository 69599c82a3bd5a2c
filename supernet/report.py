"""Figures (one helper that writes every PNG atomically), the training-curve plot and the summary lines."""
from __future__ import annotations

import io
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


def plot_curves(history: List[Dict[str, float]], path: str) -> None:
    if not history:
        return

    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(epochs, [r["train_ce"] for r in history], label="max subnet cross-entropy")
    loss_axis.plot(epochs, [r["train_kd"] for r in history], label="KD loss (mean over students)")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_yscale("log")
    loss_axis.legend()
    loss_axis.set_title("training losses")
    accuracy_axis.plot(epochs, [r["val_top1_max"] for r in history], marker="o", label="max subnet")
    accuracy_axis.plot(epochs, [r["val_top1_min"] for r in history], marker="o", label="min subnet")
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
