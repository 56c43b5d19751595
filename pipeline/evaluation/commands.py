"""`python -m pipeline eval [--docs DIR --qa FILE]` and `python -m pipeline retrieval-eval`."""
from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

from pipeline.artifacts import Artifacts
from pipeline.errors import UserError


def run_eval_command(cfg, docs: str | None, qa: str | None, out: str, overrides=()) -> None:
    from pipeline.runner import run_pipeline

    if not docs and not qa:
        run_pipeline(cfg, only="eval")
        print(f"report: {cfg.paths.resolve('reports') / 'eval.md'}")
        return
    if not (docs and qa):
        raise UserError("give both --docs DIR and --qa FILE (or neither, for the project's eval)")
    from pipeline.data.records import DataError, read_records
    from pipeline.retrieval.commands import index_folder
    from pipeline.retrieval.retriever import Retriever
    from pipeline.stages.evaluate import score

    records, problems = read_records(Path(qa))
    if problems:
        raise DataError("\n".join(problems))
    if not records:
        raise UserError(f"{qa} holds no records")
    artifacts = Artifacts(cfg.paths.resolve("artifacts"))
    artifacts.require("base")
    with tempfile.TemporaryDirectory(prefix="alignrag-eval-") as tmp:
        index_folder(cfg, docs, str(Path(tmp) / "index"))
        retriever = Retriever(Path(tmp) / "index", cfg.retrieval)
        out_dir = Path(out).resolve()
        command = shlex.join(["python", "-m", "pipeline", "eval", "--docs", str(docs), "--qa", str(qa),
                              "--out", str(out), *overrides])
        header = f"# Evaluation on {qa} over {docs}\n\nMade by `{command}`; greedy decoding, seed {cfg.seed}."
        score(artifacts, records, retriever, cfg.eval, [out_dir], header, set(), cfg.seed)
    print(f"report: {out_dir / 'eval.md'}")


def run_retrieval_eval(cfg, tune: bool = False) -> None:
    from pipeline.data.records import load_split
    from pipeline.evaluation.retrieval_eval import evaluate_retrieval, write_retrieval_report
    from pipeline.retrieval.retriever import Retriever

    artifacts = Artifacts(cfg.paths.resolve("artifacts"))
    retriever = Retriever(artifacts.require("index"), cfg.retrieval)
    if tune:
        from pipeline.evaluation.fusion_tuning import tune_fusion

        print("nDCG@10 on the training questions (set the best with retrieval.<key>=<value>):")
        for ndcg, overrides in tune_fusion(retriever, load_split(cfg.paths.resolve("qa"), "train")):
            print(f"  {ndcg:.4f}  " + " ".join(f"retrieval.{k}={v}" for k, v in overrides.items()))
        return
    report = evaluate_retrieval(retriever, load_split(cfg.paths.resolve("qa"), "eval"))
    write_retrieval_report(report, cfg.paths.resolve("reports"))
    print((cfg.paths.resolve("reports") / "retrieval.md").read_text())
