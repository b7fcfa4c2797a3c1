"""Plots (PNG, matplotlib): training curves, bucket-load histograms, benchmark curves.

    python launch/plot.py curves --workdir=runs/irli-glove --out=out/irli-glove-curves.png
    python launch/plot.py buckets --workdir=runs/irli-glove --out=out/irli-glove-buckets.png
    python launch/plot.py ann --bench=out/bench_ann.json --out=out/bench_ann.png
"""
import json
import os

import matplotlib
import numpy as np
from absl import flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxidx import bench, cli  # noqa: E402
from jaxidx.train.metrics_log import read_metrics  # noqa: E402

flags.DEFINE_string("workdir", None, "Run directory (curves, buckets).")
flags.DEFINE_string("bench", None, "bench_ann JSON (ann).")
flags.DEFINE_string("out", "out/plot.png", "PNG path.")
FLAGS = flags.FLAGS


def run_metrics(workdir: str) -> list[dict]:
    """The run's logged metrics; a run trained in stages (ELIAS: stage1/, stage2/) logs per stage, and its
    stages are joined in order, each one's steps continuing after the previous stage's last step."""
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return read_metrics(workdir)
    stages = sorted(d for d in os.listdir(workdir) if os.path.exists(os.path.join(workdir, d, "metrics.jsonl")))
    if not stages:
        raise ValueError(f"{workdir}: no metrics.jsonl (in the run or its stage directories)")
    out, offset = [], 0
    for d in stages:
        recs = read_metrics(os.path.join(workdir, d))
        out += [dict(r, step=r["step"] + offset) for r in recs]
        offset += max((r["step"] for r in recs), default=0)
    return out


def plot_curves(workdir: str, out: str) -> None:
    """Training loss and examples/s per step, and bucket load after each re-partition."""
    recs = run_metrics(workdir)
    train = [r for r in recs if "train/loss" in r]
    part = [r for r in recs if "partition/max_over_mean" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[1].plot([r["step"] for r in train], [r["train/examples_per_second"] for r in train])
    axes[1].set(xlabel="step", ylabel="examples/s", title="throughput")
    if part:
        axes[2].plot([r["step"] for r in part], [r["partition/max_over_mean"] for r in part], "o-", label="max/mean")
        axes[2].plot([r["step"] for r in part], [r["partition/empty_fraction"] for r in part], "s-", label="empty")
        axes[2].legend()
    axes[2].set(xlabel="step", title="bucket load after re-partition")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def bucket_sizes(workdir: str) -> np.ndarray:
    """Items per bucket [R, B] of the index of a run's newest checkpoint (or of a saved index)."""
    import jaxidx
    offsets = jaxidx.load(workdir).arrays["offsets"]
    return np.diff(offsets.reshape(-1, offsets.shape[-1]), axis=1)


def plot_buckets(sizes: np.ndarray, out: str, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(sizes.ravel(), bins=50)
    mean = sizes.mean()
    ax.axvline(mean, color="k", ls="--", lw=1)
    ax.set(xlabel="items per bucket", ylabel="buckets",
           title=f"{title} (mean {mean:.0f}, max {sizes.max()}, empty {(sizes == 0).mean():.1%})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv):
    cli.init_runtime()  # library INFO (orbax) stays quiet
    what = argv[1] if len(argv) > 1 else "curves"
    if what in ("curves", "buckets") and not FLAGS.workdir:
        raise ValueError(f"plot {what}: --workdir is required")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    if what == "curves":
        plot_curves(FLAGS.workdir, FLAGS.out)
    elif what == "buckets":
        plot_buckets(bucket_sizes(FLAGS.workdir), FLAGS.out, FLAGS.workdir)
    elif what == "ann":
        with open(FLAGS.bench) as f:
            res = json.load(f)
        bench.plot_ann_curves(res["rows"], FLAGS.out, f"{res['data']}, {res['threads']} thread(s)")
    else:
        raise ValueError(f"unknown plot {what!r}; valid: curves, buckets, ann")
    print(FLAGS.out)


if __name__ == "__main__":
    cli.run(main)
