"""Evaluate a trained index from its checkpoint.

    python launch/eval.py --workdir=runs/irli-glove-small [--step=N] [--config.data=SPEC]
        [--config.search.settings='[{"m": 4, "min_count": 2}]']

The config is the one saved with the checkpoint; `--config.X=V` overrides a
field (unknown fields are an error). Prints the results and writes eval.json
(or --out) into the workdir.
"""
import sys

from absl import app, flags

from jaxidx import cli
from jaxidx.evaluate import format_results
from jaxidx.runner import evaluate_checkpoint

flags.DEFINE_string("workdir", None, "Run directory holding checkpoints.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: newest readable).")
flags.DEFINE_string("out", "eval.json", "Result file name inside --workdir.")
cli.define_distributed_flags()
flags.mark_flag_as_required("workdir")
_OVERRIDES = {}


def main(argv):
    del argv
    cli.init_runtime()
    f = flags.FLAGS
    out = evaluate_checkpoint(f.workdir, f.step, _OVERRIDES, f.out)
    print(f"{out['method']} on {out['data']}: step {out['step']}")
    print(format_results(out["results"]))


if __name__ == "__main__":
    argv, _OVERRIDES = cli.split_config_overrides(sys.argv)
    app.run(main, argv=argv)
