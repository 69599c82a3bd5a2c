"""The paper's Figure 2 from this project's own loss: a teacher, a student that under-estimates its
uncertainty and one that over-estimates it, and D_alpha(teacher || student) over alpha.

    python docs/figure2.py [--out docs/figure2.png]

Each divergence is `adaptive_kd_reference` (the executable spec of the fused op) with both alphas equal
and the importance weight unclipped, so alpha = 1 is KL(p || q) and alpha = 0 is KL(q || p). Prints the
table the figure shows.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List

import torch

from alphadiv_kernels import adaptive_kd_reference
from alphadiv_kernels.adaptive_kd import UNCLIPPED

CLASSES = 5
# Teacher: class 1 dominant, with a second local mode at class 3 and little mass on class 4
TEACHER = [0.08, 0.55, 0.04, 0.30, 0.03]
EXAMPLES = {
    # Example 1: confident on the dominant mode, the local mode missed (under-estimated uncertainty)
    "under-estimation": [0.02, 0.93, 0.02, 0.02, 0.01],
    # Example 2: spread out, its top class is class 4 (over-estimated uncertainty, wrong class)
    "over-estimation": [0.14, 0.20, 0.14, 0.24, 0.28],
}
ALPHAS = [round(-2.0 + 0.05 * i, 2) for i in range(81)]  # -2 ... 2
TABLE_ALPHAS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def divergences(student: List[float]) -> Dict[float, float]:
    """D_alpha(teacher || student) for every alpha of ALPHAS."""
    logits = torch.tensor([student], dtype=torch.float64).log()
    teacher = torch.tensor([TEACHER], dtype=torch.float64).log()
    return {alpha: adaptive_kd_reference(logits, teacher, alpha_min=alpha, alpha_max=alpha, clip=UNCLIPPED).item()
            for alpha in ALPHAS}


def table(curves: Dict[str, Dict[float, float]]) -> str:
    header = "| alpha | " + " | ".join(f"{a:g}" + (" (KL(q‖p))" if a == 0 else " (KL(p‖q))" if a == 1 else "")
                                      for a in TABLE_ALPHAS) + " |"
    rows = [header, "|---" * (len(TABLE_ALPHAS) + 1) + "|"]
    for name, curve in curves.items():
        rows.append(f"| {name} | " + " | ".join(f"{curve[a]:.3f}" for a in TABLE_ALPHAS) + " |")
    return "\n".join(rows)


def draw(curves: Dict[str, Dict[float, float]], path: str) -> None:
    from supernet.report import plt, save_figure

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    classes = range(CLASSES)
    for axis, (name, student) in zip(axes, EXAMPLES.items()):
        axis.bar([c - 0.2 for c in classes], TEACHER, 0.4, label="teacher p")
        axis.bar([c + 0.2 for c in classes], student, 0.4, label="student q")
        axis.set_xticks(list(classes))
        axis.set_xlabel("class")
        axis.set_title(f"uncertainty {name}")
        axis.legend()
    for name, curve in curves.items():
        axes[2].plot(ALPHAS, [curve[a] for a in ALPHAS], label=name)
    axes[2].axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("alpha (1: KL(p||q), 0: KL(q||p))")
    axes[2].set_ylabel("D_alpha(p || q)")
    axes[2].set_title("alpha-divergence to the teacher")
    axes[2].legend()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figure2.png"))
    args = parser.parse_args()
    curves = {name: divergences(student) for name, student in EXAMPLES.items()}
    draw(curves, args.out)
    print(table(curves))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
