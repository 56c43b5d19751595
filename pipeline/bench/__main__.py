"""`python -m pipeline.bench` (`make bench`): writes reports/bench.json and reports/bench.md.

Every figure is a ratio against a baseline measured in the same run on the same machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import resource

from pipeline.artifacts import Artifacts
from pipeline.config import load_config
from pipeline.generation import LOOKUP_TOKENS
from pipeline.numeric import DECODE_THREADS, DECODE_WORKERS
from pipeline.numeric import load_variant, served_default, to_numeric_path


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--hnsw-max", type=int, default=200_000, help="largest collection given an HNSW index")
    parser.add_argument("--variant", default="sft", help="model for the generation bench (falls back to base)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["embedding", "index", "generation", "answers", "concurrency", "memory"])
    parser.add_argument("--answers", type=int, default=20, help="eval questions timed end to end")
    parser.add_argument("--onnx", nargs="*", default=["int4", "int8"],
                        help="onnxruntime-genai precisions timed beside transformers (none: skip; needs the onnx extra)")
    parser.add_argument("--engines", nargs="*", default=["ctranslate2-int8", "llama.cpp-q4_1"],
                        choices=["ctranslate2-int8", "ctranslate2-float32", "llama.cpp-q4_1"],
                        help="other engines timed beside transformers (none: skip; make bench installs them)")
    parser.add_argument("--answers-numeric", nargs="+", default=["fp32", "int8-decode"],
                        help="numeric paths timed answering end to end (the first also copy-decodes)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrent clients timed")
    parser.add_argument("--concurrency-numeric", nargs="+", default=["fp32"],
                        help="numeric paths the concurrent-clients section times (pipeline/numeric.py)")
    parser.add_argument("--lookup", type=int, default=LOOKUP_TOKENS,
                        help="prompt lookup's guessed tokens, timed for fp32, the served default and each "
                             "--answers-numeric path (0 = leave its rows out)")
    parser.add_argument("--concurrency-lookup", type=int, nargs="+", default=[LOOKUP_TOKENS, 0],
                        help="the batcher's prompt lookup settings the concurrent-clients section times")
    parser.add_argument("--decode-threads", type=int, nargs="+", default=[DECODE_THREADS],
                        help="the batcher's decode-step intra-op threads the concurrent-clients section times "
                             "(0 = every thread, on the thread serving model calls; 1 = one, in each worker)")
    parser.add_argument("--decode-workers", type=int, nargs="+", default=[DECODE_WORKERS],
                        help="the batcher's decode workers the concurrent-clients section times")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[8],
                        help="the batcher's rows in decode, across its workers, the concurrent-clients section times "
                             "(the service's --max-batch: 8)")
    parser.add_argument("--memory-numeric", nargs="+", default=["fp32", "int8-decode"],
                        help="numeric paths whose serving memory is measured, each in a fresh process")
    parser.add_argument("--out", default="bench", help="report name: reports/<out>.json and .md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.profile)
    artifacts = Artifacts(cfg.paths.resolve("artifacts"))
    from pipeline.data.records import load_split
    from pipeline.retrieval.retriever import Retriever

    from pipeline.bench import generation, retrieval

    retriever = Retriever(artifacts.require("index"), cfg.retrieval)
    records = load_split(cfg.paths.resolve("qa"), "eval")
    from pipeline.cpu import describe

    report: dict = {"machine_note": "same-run ratios; absolute numbers depend on the machine and its load",
                    "cpu": describe()}
    answerable = [r for r in records if r.answerable]
    if "embedding" not in args.skip:
        texts = [c.embed_text for c in retriever.chunks]
        relevant = [{i for i, c in enumerate(retriever.chunks) if c.doc_id == r.doc} for r in answerable]
        report["embedding"] = retrieval.embedding_paths(texts, [r.question for r in answerable], relevant)
    if "index" not in args.skip:
        import time

        embed_times = []
        for r in answerable[:50]:
            started = time.perf_counter()
            retriever.embedder.encode_query(r.question)
            embed_times.append(time.perf_counter() - started)
        query_vectors = retriever.embedder.encode([r.question for r in answerable])
        report["index"] = retrieval.index_latency(retriever.embeddings, query_vectors, args.sizes,
                                                  args.hnsw_max, embed_times)
        hybrid = []
        for r in answerable[:100]:
            started = time.perf_counter()
            retriever.search(r.question, mode="hybrid")
            hybrid.append(time.perf_counter() - started)
        report["hybrid_query_on_project_index"] = {"chunks": len(retriever.chunks), **retrieval._percentiles(hybrid)}
        report["peak_rss_mb_after_index_bench"] = peak_rss_mb()
    variant = args.variant if artifacts.meta(args.variant) else "base"
    if "memory" not in args.skip:  # first: fresh processes, measured before this one grows
        from pipeline.bench import memory

        rows = [memory.measure(args.profile, path, variant, [r.question for r in answerable[:2]])
                for path in args.memory_numeric]
        for row in rows:
            row["rss_vs_first"] = round(row["rss_mb"] / rows[0]["rss_mb"], 2)
        report["memory"] = {"variant": variant, "rows": rows}
    if not {"generation", "answers", "concurrency"} <= set(args.skip):  # one load serves these sections
        model, tokenizer = load_variant(artifacts, variant)
    if "generation" not in args.skip:
        messages = generation.rag_prompt(retriever, tokenizer)
        rows = {}
        for name, path_model in generation.numeric_paths(model).items():
            rows[name] = generation.time_generation(path_model, tokenizer, messages)
        reference = generation.greedy_ids(model, tokenizer, messages) if args.lookup else []
        for path in dict.fromkeys(["fp32", served_default()]) if args.lookup else []:  # the service's too
            path_model = model if path == "fp32" else to_numeric_path(copy.deepcopy(model), path)
            rows[f"{path} + prompt lookup ({args.lookup})"] = {
                **generation.time_generation(path_model, tokenizer, messages, lookup_tokens=args.lookup),
                "tokens_as_fp32": generation.agreement(
                    generation.greedy_ids(path_model, tokenizer, messages, lookup_tokens=args.lookup), reference)}
        rows.update(onnx_rows(args.onnx, artifacts, variant, model, tokenizer, messages))
        rows.update(engine_rows(args.engines, artifacts, variant, model, tokenizer, messages))
        base = rows["fp32 (baseline)"]
        for row in rows.values():
            row["decode_speedup"] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
            row["ttft_speedup"] = round(base["ttft_s"] / row["ttft_s"], 2)
        fastest = max(rows, key=lambda n: rows[n]["decode_tokens_per_s"])
        report["generation"] = {"variant": variant, "paths": rows, "fastest": fastest}
        report["peak_rss_mb"] = peak_rss_mb()
    if "answers" not in args.skip:
        from pipeline.copying import load_selector

        selector = load_selector(artifacts.dir(variant)) if variant != "base" else None
        reader = None
        if selector is not None and selector.reads_reader:
            from pipeline.reader import Reader

            reader = Reader(artifacts.require("reader"))
        paths = {name: model if name == "fp32" else to_numeric_path(copy.deepcopy(model), name)
                 for name in args.answers_numeric}
        others = dict(e[:2] for e in (make_engine(n, artifacts, variant, tokenizer) for n in args.engines or []) if e)
        report["answers"] = {"variant": variant, **generation.answer_latency(
            retriever, paths, tokenizer, selector, [r.question for r in answerable[:args.answers]], reader=reader,
            engines=others, lookup_tokens=args.lookup,
            batched=[name for name in paths if name == served_default()])}
    if "concurrency" not in args.skip:
        rows = []
        for path in args.concurrency_numeric:
            path_model = model if path == "fp32" else to_numeric_path(copy.deepcopy(model), path)
            for lookup in args.concurrency_lookup:
                for threads in args.decode_threads:
                    for workers in args.decode_workers:
                        for max_batch in args.max_batch:
                            rows += [{"numeric": path, **row} for row in generation.concurrency(
                                retriever, path_model, tokenizer, [r.question for r in answerable], args.clients,
                                max_batch=max_batch, lookup_tokens=lookup, decode_threads=threads,
                                workers=workers)]
        report["concurrency"] = {"variant": variant, "rows": rows}
        report["peak_rss_mb"] = peak_rss_mb()
    out = cfg.paths.resolve("reports")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.out}.md").write_text(render(report))
    print(render(report))


def onnx_rows(precisions, artifacts, variant, model, tokenizer, messages) -> dict:
    """onnxruntime-genai rows for the generation table (pipeline/ort_genai.py), conversions cached."""
    from pipeline import ort_genai
    from pipeline.bench import generation

    if not precisions:
        return {}
    if not ort_genai.available():
        logging.getLogger("bench").warning("onnxruntime-genai is not installed (pip install -e '.[onnx]'): "
                                           "its rows are skipped")
        return {}
    reference = generation.greedy_ids(model, tokenizer, messages)
    rows = {}
    for precision in precisions:
        folder = ort_genai.converted(artifacts, variant, precision)
        rows[f"onnxruntime-genai {precision}"] = generation.time_engine(
            ort_genai.OrtGenerator(folder), tokenizer, messages, reference)
    return rows


def make_engine(name: str, artifacts, variant: str, tokenizer):
    """(label, generator, reference variant) for a ``--engines`` name (pipeline/engines.py), or
    None when its package is not installed. llama.cpp runs the wheel's Q4_1 GGUF: the base model."""
    from pipeline import engines

    package = "ctranslate2" if name.startswith("ctranslate2") else "llama_cpp"
    if not engines.available(package):
        logging.getLogger("bench").warning("%s is not installed (make bench installs it): row '%s' skipped",
                                           package, name)
        return None
    if package == "ctranslate2":
        quantization = name.split("-", 1)[1]
        return (f"CTranslate2 {quantization}", engines.Ct2Generator(
            engines.ct2_converted(artifacts, variant, quantization), tokenizer), variant)
    return "llama.cpp Q4_1 (base model)", engines.LlamaCppGenerator(), "base"


def engine_rows(names, artifacts, variant, model, tokenizer, messages) -> dict:
    """CTranslate2 and llama.cpp rows for the generation table, each compared with its own
    model's fp32 greedy tokens (llama.cpp's with the base model's)."""
    from pipeline.bench import generation

    rows = {}
    for name in names or []:
        engine = make_engine(name, artifacts, variant, tokenizer)
        if engine is None:
            continue
        label, generator, reference_variant = engine
        reference_model = model if reference_variant == variant else load_variant(artifacts, reference_variant)[0]
        rows[label] = generation.time_engine(generator, tokenizer, messages,
                                             generation.greedy_ids(reference_model, tokenizer, messages))
    return rows


def _table(rows: list[dict]) -> list[str]:
    keys = list(rows[0])
    return ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"] + [
        "| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]


def render(report: dict) -> str:
    lines = ["# Benchmarks", "", "Made by `make bench` (`python -m pipeline.bench`); " + report["machine_note"] + ".",
             "", f"CPU: {report.get('cpu', 'not recorded')}.", ""]
    if "embedding" in report:
        lines += ["## Embedding the project's chunks (all-MiniLM-L6-v2)", ""]
        lines += _table([{"path": k, **v} for k, v in report["embedding"].items()]) + [""]
    if "index" in report:
        lines += ["## Vector search on synthetic collections (clustered around real embeddings)", ""]
        lines += _table(report["index"]) + [""]
        h = report["hybrid_query_on_project_index"]
        lines += [f"Hybrid query (embed + faiss + BM25 + fusion) on the project index ({h['chunks']} chunks): "
                  f"p50 {h['p50_ms']} ms, p95 {h['p95_ms']} ms.", ""]
    if "generation" in report:
        g = report["generation"]
        lines += [f"## Generation ({g['variant']} variant, LoRA merged), a ~600-token RAG prompt", ""]
        lines += _table([{"path": k, **v} for k, v in g["paths"].items()]) + [""]
        lines += [f"Fastest decoding: {g['fastest']}. Its quality cost (key-fact accuracy against fp32 on the "
                  "held-out questions) is measured by the eval stage: see reports/eval.md.", ""]
    if "answers" in report:
        a = report["answers"]
        lines += [f"## A RAG question answered end to end ({a['variant']} variant, {a['questions']} held-out "
                  "questions)", "",
                  f"Retrieval, prompt and reply, as served. Free decoding writes a fixed {a['new_tokens']}-token "
                  "answer, the system turn's cache reused (other engines read the whole prompt; llama.cpp "
                  "runs the base model); its time to first token counts retrieval and "
                  "the prompt too. Copy decoding (the served path for a variant with a selector, "
                  "pipeline/copying.py) scores the shown sentences and returns one; it writes no tokens. "
                  "Rows timed in this process's main thread, except \"service's batcher\": the served "
                  "numeric path as the service runs it, asked from another thread through the batcher while "
                  "this thread runs its model calls: prompts and decode steps (pipeline/model_calls.py); "
                  "\"model calls in its workers\": the same with no thread serving model calls, so the workers "
                  "read the prompts and step with every thread themselves "
                  "(slower: a second thread's OpenMP pool slows every region; docs/results.md, speed).", ""]
        rows = [{"path": f"free, {name}", **timing} for name, timing in a["free"].items()]
        if "copy_decoding" in a:
            rows.append({"path": f"copy decoding, {next(iter(a['free']))}", **a["copy_decoding"],
                         "ttft_p50_ms": a["copy_decoding"]["p50_ms"], "ttft_whole_prompt_p50_ms": "-"})
        lines += _table(rows) + [""]
        if "lookup_replies_as_without" in a:
            same = ", ".join(f"{k} {v}" for k, v in a["lookup_replies_as_without"].items())
            lines += [f"Prompt lookup decoding (pipeline/generation.py, `lookup_draft`) feeds guessed tokens "
                      f"and keeps those the model itself chooses; replies identical to the same path's "
                      f"without it: {same}.", ""]
    if "concurrency" in report:
        c = report["concurrency"]
        lines += [f"## Concurrent clients ({c['variant']} variant, free decoding, 40-token replies)", "",
                  "Each client asks 2 held-out questions one after another (retrieval, prompt, reply) "
                  "through the service's batcher (pipeline/batching.py): between two decode steps the "
                  "waiting requests read their prompts and join the replies being written. Aggregate "
                  "tokens/s: every token / wall time; decode tokens/s: tokens written by decode steps / "
                  "time in decode steps (prompt reading left out). `lookup`: the guessed tokens of "
                  "prompt lookup decoding, shared by the rows decoding together (0 = off; the service's "
                  f"default is {LOOKUP_TOKENS}). `decode_threads`: the intra-op threads of the "
                  f"batcher's decode steps (0 = every thread, run on the thread serving the model calls; 1 = one, "
                  f"in each worker, in parallel; the service's default is {DECODE_THREADS}); "
                  f"`workers`: its decode workers, each decoding its own batch (the service's "
                  f"default is {DECODE_WORKERS}). Decode tokens/s sums the workers' step times, so it "
                  "understates parallel workers; aggregate tokens/s is wall time.",
                  ""]
        lines += _table(c["rows"]) + [""]
    if "memory" in report:
        m = report["memory"]
        lines += [f"## Serving memory ({m['variant']} variant)", "",
                  "Each numeric path in a fresh process (pipeline/bench/memory.py): the service's engine "
                  "answers two held-out questions by copy decoding and one freely, then reads its "
                  "`/proc/self/status` (VmRSS resident, VmHWM peak).", ""]
        lines += _table(m["rows"]) + [""]
    if "peak_rss_mb" in report:
        lines += [f"Peak resident memory of the bench process: {report['peak_rss_mb']} MB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
