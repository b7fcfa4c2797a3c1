"""Benchmark plumbing shared by `launch/bench_*.py`: thread pinning, machine description,
result tables and plots."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys


def pin_threads(n: int) -> None:
    """Restrict this process (XLA, faiss/OpenMP, the C++ kernel) to `n` cores. Call before importing jax."""
    if n <= 0:
        return
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:n]))
    os.environ["OMP_NUM_THREADS"] = str(n)
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def machine() -> str:
    """CPU model, usable cores and Python/JAX versions, for the result files."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), model)
    except OSError:
        pass
    import jax
    return (f"{model}, {len(os.sched_getaffinity(0))} usable cores of {os.cpu_count()}, "
            f"Python {platform.python_version()}, JAX {jax.__version__} ({jax.default_backend()})")


def command() -> str:
    return " ".join(["python3"] + sys.argv)


def best_at(rows: list[dict], method: str, target: float, key: str = "recall@10") -> dict:
    """Fewest candidates and most queries/s among `method`'s rows reaching `target` recall."""
    ok = [r for r in rows if r["method"] == method and r[key] >= target]
    if not ok:
        return {"method": method, "reaches": False}
    cands = [r["candidates_per_query"] for r in ok if r.get("candidates_per_query") is not None]
    return {"method": method, "reaches": True,
            "min_candidates": min(cands) if cands else None,
            "max_queries_per_second": max(r["queries_per_second"] for r in ok)}


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def plot_ann_curves(rows: list[dict], path: str, title: str) -> None:
    """recall@10 vs candidates/query and vs queries/s, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        with_c = sorted((r for r in rs if r.get("candidates_per_query")), key=lambda r: r["candidates_per_query"])
        if with_c:
            a.plot([r["candidates_per_query"] for r in with_c], [r["recall@10"] for r in with_c], "o-", label=name)
        by_q = sorted(rs, key=lambda r: r["queries_per_second"])
        b.plot([r["queries_per_second"] for r in by_q], [r["recall@10"] for r in by_q], "o-", label=name)
    a.set(xscale="log", xlabel="candidates per query", ylabel="recall@10", title=title)
    b.set(xscale="log", xlabel="queries per second (1 thread)", ylabel="recall@10", title=title)
    for ax in (a, b):
        ax.axhline(0.9, color="grey", lw=0.5, ls="--")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
