"""Command line: ``python -m pipeline <command>``. Each command is a thin call into a module."""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.artifacts import MissingArtifact
from pipeline.config import ConfigError, load_config
from pipeline.runner import UnknownStage, run_pipeline, status_table

USER_ERRORS = (ConfigError, MissingArtifact, UnknownStage, FileNotFoundError)


def _add_profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="quick", help="configs/<profile>.yaml (tiny, quick, full)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. sft.lora.r=8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="build every stale stage (or a chosen one)")
    _add_profile(run)
    run.add_argument("--only", metavar="STAGE", help="build just this stage")
    run.add_argument("--from", dest="start", metavar="STAGE",
                     help="rebuild this stage and every stage after it")
    run.add_argument("--force", action="store_true", help="rebuild even when up to date")

    status = commands.add_parser("status", help="table of stages: built / stale / missing")
    _add_profile(status)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            cfg = load_config(args.profile, args.overrides)
            run_pipeline(cfg, only=args.only, start=args.start, force=args.force)
        elif args.command == "status":
            print(status_table(load_config(args.profile, args.overrides)))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
