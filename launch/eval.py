"""Evaluate a trained index from its checkpoint.

    python launch/eval.py --workdir=runs/irli-glove-small [--step=N] [--config.data=SPEC]
        [--config.search.settings='[{"m": 4, "min_count": 2}]'] [--out=NAME] [--overwrite]

The config is the one saved with the checkpoint; `--config.X=V` overrides a field (unknown fields are
an error). Prints the results and writes them into the workdir as eval-step<N>.json (with a digest of
the overrides when there are any) or --out; an existing result file is refused without --overwrite.
"""
import sys

from absl import flags

from jaxidx import cli
from jaxidx.evaluate import format_results
from jaxidx.runner import evaluate_checkpoint

flags.DEFINE_string("workdir", None, "Run directory holding checkpoints.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: newest readable).")
flags.DEFINE_string("out", None, "Result file name inside --workdir (default: eval-step<N>[-<digest>].json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing result file.")
cli.define_distributed_flags()
flags.mark_flag_as_required("workdir")
_OVERRIDES = {}


def main(argv):
    del argv
    cli.init_runtime()
    f = flags.FLAGS
    out = evaluate_checkpoint(f.workdir, f.step, _OVERRIDES, f.out, overwrite=f.overwrite)
    print(f"{out['method']} on {out['data']}: step {out['step']}")
    print(format_results(out["results"]))
    if "eval_path" in out:
        print(f"results: {out['eval_path']}")


if __name__ == "__main__":
    argv, _OVERRIDES = cli.split_config_overrides(sys.argv)
    cli.run(main, argv)
