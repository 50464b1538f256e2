"""The `medclf` command: train, score, drift, evaluate, explain, serve, export, calibrate, prior, ensemble, runs,
demo.

Each subcommand: parse arguments -> load and validate the config (failing before any work) ->
one call into the library. `jobs/*.py` are the same subcommands under their own names, for
`ray job submit`. The commands live by concern: parsers (arguments and config), training, scoring,
reports and tools.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from medclf.cli.parsers import (calibrate_parser, demo_parser, drift_parser, ensemble_parser, evaluate_parser,
                                explain_parser, export_parser, phantoms_parser, prior_parser, runs_parser, score_parser, serve_parser,
                                train_parser)
from medclf.cli.reports import cmd_drift, cmd_evaluate
from medclf.cli.scoring import cmd_explain, cmd_score, cmd_serve
from medclf.cli.tools import cmd_calibrate, cmd_ensemble, cmd_export, cmd_prior, cmd_runs
from medclf.cli.training import cmd_demo, cmd_phantoms, cmd_train
from medclf.errors import UserError
from medclf.ops import logs


COMMANDS = {
    "phantoms": (phantoms_parser, cmd_phantoms),
    "train": (train_parser, cmd_train),
    "score": (score_parser, cmd_score),
    "drift": (drift_parser, cmd_drift),
    "evaluate": (evaluate_parser, cmd_evaluate),
    "explain": (explain_parser, cmd_explain),
    "export": (export_parser, cmd_export),
    "serve": (serve_parser, cmd_serve),
    "runs": (runs_parser, cmd_runs),
    "demo": (demo_parser, cmd_demo),
    "calibrate": (calibrate_parser, cmd_calibrate),
    "prior": (prior_parser, cmd_prior),
    "ensemble": (ensemble_parser, cmd_ensemble),
}


def run_command(name: str, argv: list[str], prog: Optional[str] = None) -> int:
    """Parse `argv` for subcommand `name` and run it; user errors print one clear message, exit 2; an
    output another run is writing (LeaseHeld) exits 3, so a scheduler can tell "try later" apart."""
    make_parser, command = COMMANDS[name]
    args = make_parser(prog or f"medclf {name}").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logs.set_verbose(getattr(args, "verbose", False))
    logs.quiet_python_warnings()
    if getattr(args, "verbose", False):
        # Only our own loggers: botocore at DEBUG logs request headers (session token, access key id).
        logging.getLogger("medclf").setLevel(logging.DEBUG)
    from medclf.score.lease import LEASE_HELD_EXIT, LeaseHeld

    try:
        return command(args)
    except LeaseHeld as exc:  # a UserError, but its own status: "try later", not "fix your input"
        print(f"error: {exc}", file=sys.stderr)
        return LEASE_HELD_EXIT
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        from medclf import __version__

        print(f"medclf {__version__}")
        return 0
    parser = argparse.ArgumentParser(prog="medclf", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=commands_help())
    parser.add_argument("-V", "--version", action="store_true", help="print medclf's version and exit")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                        help="what to run (below); `medclf COMMAND --help` for its options")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
    return run_command(argv[0], argv[1:])


def commands_help() -> str:
    """One line per command: the first sentence of its parser's description."""
    lines = ["commands:"]
    for name, (make_parser, _) in COMMANDS.items():
        first = (make_parser(f"medclf {name}").description or "").split(". ")[0].split("; ")[0].rstrip(".")
        lines.append(f"  {name:<10}{first}")
    return "\n".join(lines)
