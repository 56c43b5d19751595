"""``python -m service``: serve the chat UI and the OpenAI-compatible API.

    python -m service [--host H] [--port P] [--variant NAME] [--index DIR | --docs DIR]
                      [--no-build] [--profile quick]

Without ``--no-build``, the trained adapters shipped in adapters/ are installed where their
stage is not built, so the first `make chat` serves an aligned model, and the stages the chat
needs (base, index, and the reader its copy decoding reads) are built first on the chosen
profile when they are missing.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

from pipeline.artifacts import Artifacts, inputs_digest
from pipeline.config import REPO_ROOT, load_config
from pipeline.data.feedback import FeedbackStore
from pipeline.errors import UserError
from pipeline.cpu import describe
from pipeline.generation import LOOKUP_TOKENS
from pipeline.numeric import DECODE_THREADS, DECODE_WORKERS, NUMERIC_PATHS, served_default
from service.engine import DEFAULT_NUMERIC

NEEDED = ("base", "index")
SHIPPED = REPO_ROOT / "adapters"  # small trained LoRA adapters that `make pipeline` reproduces
# "auto" serves the first of these that is built (or shipped). Served by copy decoding they
# answer alike (README "Results"); sft comes first because its adapter is shipped.
VARIANT_PREFERENCE = ("sft", "dpo", "ppo", "base")


def install_shipped(artifacts: Artifacts) -> list[str]:
    """Copy each shipped adapter whose stage is not built into artifacts/; the names copied.

    A shipped stage carries the meta.json (fingerprint included) of the run that trained it,
    so `python -m pipeline status` treats it like any built stage, and `make pipeline`
    retrains it only if the code, config or data it was built from changed."""
    import shutil

    copied = []
    for folder in sorted(SHIPPED.glob("*/meta.json")) if SHIPPED.is_dir() else []:
        stage = folder.parent.name
        if artifacts.meta(stage) is None:
            shutil.copytree(folder.parent, artifacts.dir(stage))
            copied.append(stage)
    return copied


def choose_variant(requested: str, artifacts: Artifacts) -> str:
    if requested != "auto":
        return requested
    return next(v for v in VARIANT_PREFERENCE if v == "base" or artifacts.meta(v) is not None)


def docs_cache(cfg, docs: Path) -> Path:
    """Index a folder on the fly, into a cache folder keyed by its content."""
    from pipeline.retrieval.commands import index_folder

    digest = hashlib.sha256(repr(sorted(inputs_digest([docs]).items())).encode()).hexdigest()[:12]
    folder = REPO_ROOT / "cache" / "indexes" / digest
    if not (folder / "manifest.json").exists():
        index_folder(cfg, str(docs), str(folder))
    return folder


def reader_needed(artifacts: Artifacts) -> bool:
    """Whether a built (or shipped) variant copy-decodes with the reader's scores."""
    from pipeline.copying import load_selector

    for variant in VARIANT_PREFERENCE:
        selector = load_selector(artifacts.dir(variant)) if artifacts.meta(variant) is not None else None
        if selector is not None and selector.reads_reader:
            return True
    return False


def ensure_built(cfg, no_build: bool, need_index: bool) -> None:
    """Build what the chat needs and is missing: base, the index (unless other documents are
    served), and the reader when a variant copy-decodes with it (it trains on the project's
    questions over the project index, so that index is built for it too)."""
    from pipeline.runner import run_pipeline

    artifacts = Artifacts(cfg.paths.resolve("artifacts"))
    if not no_build:
        for stage in install_shipped(artifacts):
            logging.getLogger("service").info("installed the shipped '%s' adapter from %s", stage, SHIPPED)
    want_reader = reader_needed(artifacts) and artifacts.meta("reader") is None
    missing = [s for s in NEEDED if artifacts.meta(s) is None and (s != "index" or need_index or want_reader)]
    missing += ["reader"] if want_reader else []
    if missing and no_build:
        raise UserError(f"missing artifacts: {', '.join(missing)} (--no-build was given); "
                        f"build them with: python -m pipeline run --profile {cfg.profile} --only {missing[0]}")
    for stage in missing:
        logging.getLogger("service").info("building missing stage '%s' (profile %s)", stage, cfg.profile)
        run_pipeline(cfg, only=stage)


def make_library(cfg, args, engine):
    """Uploads need the folder the served index came from: the default docs or --docs."""
    from service.library import Library

    if args.index:
        return None
    docs = Path(args.docs).resolve() if args.docs else cfg.paths.resolve("docs")
    key = hashlib.sha256(str(docs).encode()).hexdigest()[:12]
    library = Library(docs, engine.retriever.folder, REPO_ROOT / "cache" / "library" / key, cfg.index,
                      embedder=engine.retriever.embedder)  # one embedder for queries and uploads
    if library.documents():  # uploads from an earlier session: serve them again
        engine.set_index(library.rebuild())
    return library


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--variant", default="auto",
                        help=f"base, sft, ppo, dpo or auto (the first built of {', '.join(VARIANT_PREFERENCE)})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--index", help="serve an index built by `python -m pipeline index`")
    source.add_argument("--docs", help="index this folder on the fly (cached by content)")
    parser.add_argument("--numeric", default="auto", choices=("auto",) + NUMERIC_PATHS,
                        help="weights for free decoding; auto: int8-decode where the CPU has AVX2, "
                             f"else {DEFAULT_NUMERIC} (pipeline.numeric.served_default)")
    parser.add_argument("--no-build", action="store_true", help="never train; fail if artifacts are missing")
    parser.add_argument("--remote", metavar="URL", help="send generation to an OpenAI-compatible server")
    parser.add_argument("--remote-model", help="model name to ask the remote server for")
    parser.add_argument("--feedback-db", default=str(REPO_ROOT / "cache" / "feedback.sqlite"))
    parser.add_argument("--max-waiting", type=int, default=16,
                        help="API requests that may wait for the model; more get 429 with Retry-After")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="replies decoded together, one decode step for all (pipeline/batching.py)")
    parser.add_argument("--lookup-tokens", type=int, default=None,
                        help=f"tokens a greedy reply guesses from its prompt each step (prompt lookup; "
                             f"0 = off; default {LOOKUP_TOKENS}); the reply is the same, written sooner")
    parser.add_argument("--decode-threads", type=int, default=None,
                        help=f"intra-op threads of each decode step (0 = every thread, on the thread that "
                             f"reads the prompts; 1 = one, in each worker; default {DECODE_THREADS})")
    parser.add_argument("--decode-workers", type=int, default=None,
                        help=f"worker threads decoding batches in parallel, up to max-batch / workers rows "
                             f"each (default {DECODE_WORKERS})")
    parser.add_argument("--queue-timeout", type=float, default=60.0,
                        help="seconds an API request may wait for the model before a 429")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("faiss", "bm25s", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import uvicorn

        from service.app import build_app
        from service.engine import Engine

        cfg = load_config(args.profile, args.overrides)
        ensure_built(cfg, args.no_build, need_index=not (args.index or args.docs))
        index_dir = Path(args.index) if args.index else docs_cache(cfg, Path(args.docs)) if args.docs else None
        numeric = served_default() if args.numeric == "auto" else args.numeric
        logging.getLogger("service").info("free decoding runs the %s numeric path (%s)", numeric, describe())
        engine = Engine(cfg.paths.resolve("artifacts"), index_dir, cfg.retrieval,
                        remote_url=args.remote, remote_model=args.remote_model, numeric=numeric,
                        max_batch=args.max_batch, max_waiting=args.max_waiting, queue_timeout=args.queue_timeout,
                        lookup_tokens=args.lookup_tokens, decode_threads=args.decode_threads,
                        decode_workers=args.decode_workers)
        engine.retriever  # load now, so a corrupt index fails before the server starts
        library = make_library(cfg, args, engine)
        variant = choose_variant(args.variant, engine.artifacts)
        logging.getLogger("service").info("serving variant '%s'", variant)
        app = build_app(engine, variant, library, FeedbackStore(Path(args.feedback_db)))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"alignrag chat on http://{args.host}:{args.port}  (OpenAI API at /v1)", flush=True)
    serve(uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")))
    return 0


def serve(server) -> None:
    """Run the web server in a thread while this thread, which loaded the models, runs every
    multi-threaded model call (pipeline/model_calls.py); Ctrl-C or SIGTERM stops it."""
    import signal

    from pipeline import model_calls

    def stop(*_):  # as uvicorn's own handler: a second signal stops without waiting for requests
        server.force_exit = server.should_exit
        server.should_exit = True

    for received in (signal.SIGINT, signal.SIGTERM):  # uvicorn listens for them only on the main thread
        signal.signal(received, stop)
    model_calls.serve_while(server.run)


if __name__ == "__main__":
    sys.exit(main())
