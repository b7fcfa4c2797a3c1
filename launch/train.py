"""Train a learned index, then evaluate it on the test queries.

    python launch/train.py --config=configs/irli.py:glove-small --workdir=runs/irli-glove-small
    python launch/train.py --config=configs/irli.py:bibtex --workdir=runs/b --config.train.epochs=5

A --workdir that already holds a checkpoint of the same run resumes from it; one of another run is
refused with the differing field named. Writes checkpoints, metrics.jsonl, TensorBoard logs and
eval.json into --workdir and prints where. Exit status: 0 done, 2 an error (one line; --verbose for the
traceback), 128 + signal (143 SIGTERM, 130 SIGINT) when stopped by a signal after saving a checkpoint.
"""
from absl import flags
from ml_collections import config_flags

from jaxidx import cli
from jaxidx.evaluate import format_results
from jaxidx.runner import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Method preset, e.g. configs/irli.py:glove.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, eval.json).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.init_runtime()
    out = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, progress=flags.FLAGS.progress)
    print(f"{out['method']} on {out['data']}: step {out['step']}, trained {out['train_seconds']:.1f} s")
    print(f"checkpoints, metrics.jsonl and tensorboard/ in {out['checkpoints']}")
    if out["interrupted"]:
        print(f"stopped by signal {out['stop_signal']}: checkpoint of step {out['step']} saved; run the same "
              "command again to resume")
        return 128 + int(out["stop_signal"] or 0)
    print(format_results(out["results"]))
    if "eval_path" in out:
        print(f"results: {out['eval_path']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
