"""Flag handling shared by the `launch/` entry points."""
from __future__ import annotations

import ast
import logging as pylogging
import os

import jax
from absl import flags, logging


def define_distributed_flags() -> None:
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (SLURM / Open MPI auto-detected).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process without a scheduler).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator_address).")


def init_runtime() -> None:
    """Multi-process initialisation when asked (flags or JAXIDX_DISTRIBUTED=1), and logging."""
    f = flags.FLAGS
    if f.distributed or f.coordinator_address or os.environ.get("JAXIDX_DISTRIBUTED") == "1":
        kwargs = {}
        if f.coordinator_address:
            kwargs = dict(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                          process_id=f.process_id)
        jax.distributed.initialize(**kwargs)
    # Library INFO (orbax's per-save chatter) stays quiet; jaxidx's own progress shows on process 0.
    logging.set_verbosity(logging.WARNING)
    ours = pylogging.getLogger("jaxidx")
    if jax.process_index() == 0 and not ours.handlers:
        handler = pylogging.StreamHandler()
        handler.setFormatter(pylogging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
        ours.setLevel(pylogging.INFO)
        ours.propagate = False


def split_config_overrides(argv: list[str]) -> tuple[list[str], dict]:
    """Take `--config.a.b=VALUE` arguments out of argv (for entry points whose config comes from a
    checkpoint). Values are Python literals where they parse, else strings."""
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides
