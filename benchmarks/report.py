"""Results: one row per (case, provider); printed, and written as CSV, Markdown and a PNG plot."""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional

from .cases import KL_EAGER


@dataclass
class Row:
    shape: str
    dtype: str
    mode: str
    provider: str
    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    max_ms: float
    runs: int
    speedup_vs_eager: Optional[float]  # against the fastest eager baseline of this case (eager_baseline)
    speedup_vs_compile: Optional[float]  # against the fastest compiled baseline (compile_baseline)
    gbs: float  # byte model: read student + teacher (+ write gradient) per median time
    fraction_of_copy_bw: float
    peak_mb: Optional[float]  # inputs + everything held at the peak of one call
    peak_vs_ideal: Optional[float]  # peak / (inputs + one gradient); 1.0 is the floor
    eager_baseline: Optional[str] = None
    compile_baseline: Optional[str] = None
    speedup_vs_floor: Optional[float] = None  # log_softmax (floor) time / this time


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


HEADER = ["shape", "mode", "provider", "median ms", "min", "p20", "p80", "max", "runs", "x best eager",
          "x best compile", "GB/s", "of copy BW", "peak MB", "peak/ideal"]


def _cells(row: Row) -> List[str]:
    return [row.shape, row.mode, row.provider, _fmt(row.median_ms, 3), _fmt(row.min_ms, 3), _fmt(row.p20_ms, 3),
            _fmt(row.p80_ms, 3), _fmt(row.max_ms, 3), str(row.runs), _fmt(row.speedup_vs_eager, 1),
            _fmt(row.speedup_vs_compile, 1), _fmt(row.gbs, 1), _fmt(row.fraction_of_copy_bw * 100, 0) + "%",
            _fmt(row.peak_mb, 0), _fmt(row.peak_vs_ideal, 2)]


def summary(rows: List[Row]) -> List[str]:
    """Per case: which baselines were the fastest, and each fused provider against them and the floor."""
    lines = []
    for key in dict.fromkeys((row.shape, row.mode) for row in rows):
        case_rows = [row for row in rows if (row.shape, row.mode) == key]
        baselines = case_rows[0]
        line = (f"{key[0]} {key[1]}: fastest eager {baselines.eager_baseline or '-'}, "
                f"fastest compiled {baselines.compile_baseline or '-'}")
        kl = next((row for row in case_rows if row.provider == KL_EAGER), None)
        for row in case_rows:
            if row.provider.startswith("fused"):
                line += (f"; {row.provider} {_fmt(row.speedup_vs_eager, 1)}x / {_fmt(row.speedup_vs_compile, 1)}x"
                         f" faster, {_fmt(None if row.speedup_vs_floor is None else 1 / row.speedup_vs_floor, 2)}x"
                         " the floor's time")
                if kl is not None:
                    line += f", {_fmt(row.median_ms / kl.median_ms, 2)}x eager KL's time"
        lines.append(line)
    return lines


def print_table(rows: List[Row]) -> None:
    table = [HEADER] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    for index, line in enumerate(table):
        print("  ".join(cell.rjust(width) if i > 2 else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(line, widths))))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print()
    print("\n".join(summary(rows)))


def markdown(rows: List[Row], title: str) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += [""] + [f"- {line}" for line in summary(rows)]
    return "\n".join(lines) + "\n"


OUTPUT_NAMES = ("results.csv", "results.md", "results.png")


def output_paths(out_dir: str) -> List[str]:
    return [os.path.join(out_dir, name) for name in OUTPUT_NAMES]


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temporary path to write, renamed over `path` when the block succeeds (removed when it fails): a
    run stopped at any moment leaves the previous file or the new one, whole."""
    temporary = path + ".partial"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def write_outputs(rows: List[Row], out_dir: str, title: str) -> List[str]:
    """CSV, Markdown and PNG of the rows so far; called after every case, each file replaced whole."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path, png_path = output_paths(out_dir)
    with replacing(csv_path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    with replacing(md_path) as temporary, open(temporary, "w") as handle:
        handle.write(markdown(rows, title))
    plot(rows, png_path, title)
    return [csv_path, md_path, png_path]


def plot(rows: List[Row], path: str, title: str) -> None:
    """Median time per provider and shape (top), the fused providers' speedups (bottom), one column per
    mode; written by the project's one figure helper (atomic PNG)."""
    from supernet.report import plt, save_figure

    modes = sorted({row.mode for row in rows}, key=lambda m: m != "fwd")
    shapes = list(dict.fromkeys(row.shape for row in rows))
    providers = list(dict.fromkeys(row.provider for row in rows))
    figure, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 8), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for column, mode in enumerate(modes):
        by_key = {(row.shape, row.provider): row for row in rows if row.mode == mode}
        time_axis, speed_axis = axes[0][column], axes[1][column]
        for index, provider in enumerate(providers):
            xs = [i + index * width for i, shape in enumerate(shapes) if (shape, provider) in by_key]
            time_axis.bar(xs, [by_key[(shape, provider)].median_ms for shape in shapes if (shape, provider) in by_key],
                          width, label=provider)
        time_axis.set_yscale("log")
        time_axis.set_ylabel("median time (ms, log)")
        time_axis.set_title(f"{mode}")
        time_axis.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(shapes))], shapes)
        time_axis.legend(fontsize=8)
        fused = [p for p in providers if p.startswith("fused")]
        for index, provider in enumerate(fused):
            for baseline, attribute in (("best eager", "speedup_vs_eager"), ("best compile", "speedup_vs_compile")):
                values = [getattr(by_key[(shape, provider)], attribute) or 0 for shape in shapes
                          if (shape, provider) in by_key]
                speed_axis.plot(shapes[:len(values)], values, marker="o", label=f"{provider} vs {baseline}")
        speed_axis.axhline(1.0, color="grey", linewidth=0.8)
        speed_axis.set_yscale("log")
        speed_axis.set_ylabel("speedup (x, log)")
        speed_axis.legend(fontsize=8)
    figure.suptitle(title)
    save_figure(figure, path)
