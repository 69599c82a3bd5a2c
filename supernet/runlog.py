"""The run folder's logs: `steps.jsonl` (one line per step), `metrics.jsonl` and `metrics.csv` (one per
epoch). Lines are appended as training goes; a resumed run first cuts them back to what its checkpoint
holds, so after any kill and resume every step and every epoch appears exactly once."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, List

from .checkpoint import atomic_write, writing

STEPS, METRICS_JSONL, METRICS_CSV = "steps.jsonl", "metrics.jsonl", "metrics.csv"


def append_steps(out: str, records: List[Dict[str, float]]) -> None:
    """Append step records (a write that fails half-way leaves a cut last line, which `read_steps` and
    the resume's `rewind` drop)."""
    path = os.path.join(out, STEPS)
    with writing(path), open(path, "a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))


def append_epoch(out: str, record: Dict[str, float]) -> None:
    path = os.path.join(out, METRICS_JSONL)
    with writing(path), open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    path = os.path.join(out, METRICS_CSV)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with writing(path), open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)


def read_steps(out: str) -> List[Dict[str, float]]:
    """The step records, without a last line a kill cut short."""
    path = os.path.join(out, STEPS)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def rewind(out: str, step: int, history: List[Dict[str, float]]) -> None:
    """Cut the logs back to a checkpoint: steps up to `step`, epochs as in its `history`."""
    kept = [record for record in read_steps(out) if record["step"] <= step]
    atomic_write(os.path.join(out, STEPS), "".join(json.dumps(record) + "\n" for record in kept).encode())
    atomic_write(os.path.join(out, METRICS_JSONL), "".join(json.dumps(record) + "\n" for record in history).encode())
    table = io.StringIO()
    if history:
        writer = csv.DictWriter(table, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    atomic_write(os.path.join(out, METRICS_CSV), table.getvalue().encode())
