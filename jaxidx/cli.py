"""Flag handling shared by the `launch/` entry points, and how they end.

Exit status (documented in the README): 0 done; 2 an expected error (bad flag or config field, missing
or damaged data, a checkpoint of another run, bad search settings), printed as one line
`error: <message>` (the traceback with --verbose); 128 + the signal number (130 SIGINT, 143 SIGTERM)
for a run stopped by a signal after its checkpoint was saved, so a scheduler can tell it from a
finished one and requeue it.
"""
from __future__ import annotations

import ast
import re
import logging as pylogging
import os
import sys
from typing import Callable, Optional

import jax
from absl import flags, logging

EXIT_ERROR = 2
EXPECTED_ERRORS = (ValueError, OSError, flags.Error)  # and a config's own KeyError / AttributeError / TypeError


def run(main: Callable[[list], Optional[int]], argv: Optional[list] = None) -> None:
    """Parse flags, run `main(argv)` and exit with its status (None = 0); an expected error becomes
    `error: <message>` on one line and exit status 2, unless --verbose asks for the traceback."""
    argv = list(sys.argv if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        rest = flags.FLAGS(argv)
        status = main(rest)
    except Exception as e:  # noqa: BLE001 - sorted into expected errors (one line) and bugs (traceback)
        if verbose or not (isinstance(e, EXPECTED_ERRORS) or _from_config(e)):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(status or 0)


def _from_config(e: BaseException) -> bool:
    """A KeyError / AttributeError / TypeError raised inside ml_collections: a config field typo or a
    value of the wrong type given on the command line."""
    tb, last = e.__traceback__, ""
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return isinstance(e, (KeyError, AttributeError, TypeError)) and "ml_collections" in last


def one_line(e: BaseException) -> str:
    """An exception's message on one line: the innermost cause (flag parsing wraps the config's own
    error), quotes that KeyError / AttributeError add stripped, newlines joined with '; '."""
    while isinstance(e, flags.Error) and e.__cause__ is not None:
        e = e.__cause__
    text = str(e.args[0]) if isinstance(e, (KeyError, AttributeError)) and e.args else str(e)
    if isinstance(e, (KeyError, AttributeError)) and _from_config(e):
        m = re.match(r"""^['"]*([A-Za-z_][A-Za-z0-9_.]*)['"]*\s*(.*)$""", text, re.S)
        if m:  # ml_collections: 'field' + "Did you mean ..."
            text = f"unknown config field {m.group(1)!r}" + (f" ({m.group(2).strip()})" if m.group(2).strip() else "")
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def define_distributed_flags() -> None:
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (SLURM / Open MPI auto-detected).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process without a scheduler).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator_address).")


def init_runtime() -> None:
    """Multi-process initialisation when asked (flags or JAXIDX_DISTRIBUTED=1), and logging."""
    f = flags.FLAGS
    asked = "distributed" in f and (f.distributed or f.coordinator_address)
    if asked or os.environ.get("JAXIDX_DISTRIBUTED") == "1":
        kwargs = {}
        if "coordinator_address" in f and f.coordinator_address:
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
