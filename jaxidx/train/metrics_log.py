"""Training metrics to JSON lines and TensorBoard (tensorboardX); only process 0 writes."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


class MetricsWriter:
    """Append `{step, time, **scalars}` records to `workdir/metrics.jsonl` and TensorBoard."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict, prefix: str = "") -> None:
        if not self.active:
            return
        rec = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            v = float(np.asarray(v))
            rec[prefix + k] = v
            if self._tb is not None:
                self._tb.add_scalar(prefix + k, v, step)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (for plots and tests)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
