"""Command line: ``python -m pipeline <command>``. Each command is a thin call into a module."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import logging
import sys

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.retrieval import commands as retrieval_commands
from pipeline.retrieval.retriever import MODES
from pipeline.runner import run_pipeline, status_table

USER_ERRORS = (UserError, FileNotFoundError)


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

    index = commands.add_parser("index", help="index a folder of documents")
    index.add_argument("--docs", required=True, help="folder of .md/.txt/.html/.pdf/.jsonl files")
    index.add_argument("--out", required=True, help="index folder (updated incrementally)")
    _add_profile(index)

    search = commands.add_parser("search", help="ranked chunks for one query")
    search.add_argument("query")
    search.add_argument("--k", type=int, default=5)
    search.add_argument("--mode", choices=MODES)
    search.add_argument("--index", help="index folder (default: artifacts/index)")
    _add_profile(search)

    retrieve = commands.add_parser("retrieve", help="batch retrieval into a TREC run file")
    retrieve.add_argument("--index", required=True)
    retrieve.add_argument("--queries", required=True, help="BEIR queries.jsonl")
    retrieve.add_argument("--k", type=int, default=100)
    retrieve.add_argument("--out", required=True)
    retrieve.add_argument("--mode", choices=MODES)
    _add_profile(retrieve)

    evaluate = commands.add_parser("eval", help="score the built variants (default: the eval stage)")
    evaluate.add_argument("--docs", help="your own documents (indexed on the fly in a temp folder)")
    evaluate.add_argument("--qa", help="your own questions, in the data/qa record format")
    evaluate.add_argument("--out", default="reports/custom", help="where --docs/--qa reports go")
    _add_profile(evaluate)

    calibrate = commands.add_parser("calibrate", help="fit a built variant's copy-decoding selector on the dev split")
    calibrate.add_argument("--variant", required=True, choices=("base", "sft", "dpo", "ppo"),
                           help="base too: its selector measures what copy decoding does without training")
    _add_profile(calibrate)

    holdout = commands.add_parser("reader-holdout", help="train a reader on half the train questions outside "
                                  "dev and score it on the other half (compare reader recipes)")
    _add_profile(holdout)

    retrieval_eval = commands.add_parser("retrieval-eval", help="recall/MRR/nDCG on data/qa/eval.jsonl")
    retrieval_eval.add_argument("--tune", action="store_true",
                                help="rank hybrid fusion settings on the training questions instead")
    _add_profile(retrieval_eval)

    data = commands.add_parser("data", help="data tools: check, export-feedback")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_check = data_commands.add_parser("check", help="validate data/qa and print the counts")
    _add_profile(data_check)
    export = data_commands.add_parser("export-feedback", help="chat feedback -> preference pairs for dpo")
    export.add_argument("--db", default="cache/feedback.sqlite")
    export.add_argument("--out", default="data/feedback/prefs.jsonl")
    export.add_argument("--approve", type=int, nargs="*", default=[], metavar="ID",
                        help="feedback rows a person checked: they join the exported pairs")
    export.add_argument("--reject", type=int, nargs="*", default=[], metavar="ID",
                        help="feedback rows never to export")
    _add_profile(export)
    return parser


def calibrate_built(cfg, variant: str) -> dict:
    """(Re)fit the copy-decoding selector of a variant that is already built (pipeline/copying.py).

    Here rather than in copying.py: loading a variant for inference (pipeline/numeric.py) is
    serving code, and the training stages that fit a selector must not depend on it, or every
    change to a serving numeric path would mark their built (and shipped) adapters stale."""
    from pipeline.artifacts import Artifacts
    from pipeline.copying import calibrate_variant
    from pipeline.numeric import load_variant

    artifacts = Artifacts(cfg.paths.resolve("artifacts"))
    model, tokenizer = load_variant(artifacts, variant)
    return calibrate_variant(model, tokenizer, cfg, artifacts, artifacts.dir(variant))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("faiss", "bm25s", "httpx", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # sacreBLEU warns on every sentence score that effective_order is off; it is off on purpose
    # (pipeline/evaluation/metrics.py bleu), so one line per answer would only bury the log.
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.profile, args.overrides)
        if args.command == "run":
            run_pipeline(cfg, only=args.only, start=args.start, force=args.force)
        elif args.command == "status":
            print(status_table(cfg))
        elif args.command == "index":
            retrieval_commands.index_folder(cfg, args.docs, args.out)
        elif args.command == "search":
            retrieval_commands.search(cfg, args.query, args.k, args.mode, args.index)
        elif args.command == "eval":
            from pipeline.evaluation.commands import run_eval_command

            run_eval_command(cfg, args.docs, args.qa, args.out, args.overrides)
        elif args.command == "calibrate":
            print(json.dumps(calibrate_built(cfg, args.variant), indent=2))
        elif args.command == "reader-holdout":
            from pipeline.reader_holdout import holdout

            print(json.dumps(holdout(cfg), indent=2))
        elif args.command == "retrieval-eval":
            from pipeline.evaluation.commands import run_retrieval_eval

            run_retrieval_eval(cfg, tune=args.tune)
        elif args.command == "data" and args.data_command == "check":
            from pipeline.data.records import check

            report = check(cfg.paths.resolve("qa"), cfg.paths.resolve("docs"))
            print(json.dumps(report, indent=2))
        elif args.command == "data" and args.data_command == "export-feedback":
            from pipeline.data.feedback import FeedbackStore, export_pairs

            if not Path(args.db).exists():
                raise UserError(f"no feedback database at {args.db}; rate some answers in the chat first")
            store = FeedbackStore(Path(args.db))
            store.set_review(args.approve, "approved")
            store.set_review(args.reject, "rejected")
            for row in store.rows("pending"):
                better = f" -> better: {row['better_answer']!r}" if row["better_answer"] else ""
                print(f"pending #{row['id']} ({row['variant']}, {row['rating']:+d}): {row['answer']!r}{better}")
            count = export_pairs(store, Path(args.out))
            print(f"wrote {count} preference pairs (approved rows only) to {args.out}; review pending rows "
                  f"with --approve ID ... / --reject ID ...; the dpo stage reads them with dpo.extra_prefs={args.out}")
        elif args.command == "retrieve":
            retrieval_commands.retrieve(cfg, args.index, args.queries, args.k, args.out, args.mode)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
