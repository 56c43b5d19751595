"""Answer the held-out questions with every built variant and score the answers.

For each variant: the project template with retrieval, answered as the service answers. A
variant with a copy-decoding selector (pipeline/copying.py) copies one shown sentence or
refuses (layout ``copy``); one without decodes greedily and answers or refuses by its dev-split
threshold (layout ``template``). Optional rows: free decoding of a copying variant
(``free_decoding_variants``), without
retrieval (``no_retrieval_variants``); for the base model, its best plain layout (context
then question in one user turn), so no gain is an artefact of a prompt it cannot read; and
faster numeric paths against fp32 (``numeric_paths``). No reward model judges here: PPO was
optimised against it, so it cannot referee PPO (key facts, F1, ROUGE-L and BLEU do).
"""
from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field

from pipeline.evaluation.metrics import aggregate, score_answer
from pipeline.prompt import build_messages, build_plain_messages, retrieval_query

log = logging.getLogger("pipeline.eval")
VARIANTS = ("base", "sft", "dpo", "ppo")


ENGINE_PREFIXES = ("ort-", "ct2-")  # numeric paths run by another engine, not by transformers
# A numeric path with this suffix (fp32-lookup, int8-decode-lookup) answers one question at a
# time by prompt lookup decoding, as a lone chat user is answered.
LOOKUP_SUFFIX = "-lookup"


@dataclass
class EvalSettings:
    max_questions: int = 0  # 0 = every eval record; else a fixed, stratified sample
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))  # scored when built
    no_retrieval_variants: list[str] = field(default_factory=list)  # also scored without passages
    plain_layout_for_base: bool = False  # also score base with its best plain layout
    max_new_tokens: int = 80  # greedy answer length cap (an answer past 60 words scores 0 anyway)
    batch_size: int = 8
    decide: bool = True  # trained variants answer or refuse by their dev-split threshold (as served)
    # Variants with a copy-decoding selector (pipeline/copying.py) are scored as served: by copy
    # decoding. Listed here, they are also scored decoding freely, for comparison (slower).
    copy_decoding: bool = True
    free_decoding_variants: list[str] = field(default_factory=list)
    perplexity_chunks: int = 24  # chunks of eval-only documents for held-out perplexity
    examples: int = 4  # questions shown side by side in reports/eval.md
    # Opt-in: faster numeric paths (pipeline/numeric.py) scored again against fp32, e.g.
    # eval.numeric_paths=[int8-decode], onnxruntime-genai's (ort-int4, ort-int8, ort-fp32;
    # pipeline/ort_genai.py) or CTranslate2's (ct2-int8, ct2-float32; pipeline/engines.py), or
    # any of these with prompt lookup decoding (fp32-lookup, int8-decode-lookup;
    # pipeline/generation.py); `make bench` measures their speed.
    numeric_paths: list[str] = field(default_factory=list)
    numeric_path_variants: list[str] = field(default_factory=lambda: ["sft", "dpo", "ppo"])
    # Opt-in: best-of-n (pipeline/best_of_n.py), the reward model choosing among copy
    # decoding's n best sentences, e.g. eval.best_of_n=[4,8]; n = 1 is the copy row itself.
    best_of_n: list[int] = field(default_factory=list)
    best_of_n_variants: list[str] = field(default_factory=lambda: ["sft"])
    extractive_baseline: bool = True  # also score "copy the best-matching sentence of passage 1"
    seed: int = 0  # bootstrap resampling seed


def select(records, n: int, seed: int):
    """A deterministic sample of ``n`` records keeping the unanswerable share."""
    if not n or n >= len(records):
        return list(records)
    rng = random.Random(seed)
    answerable = [r for r in records if r.answerable]
    unanswerable = [r for r in records if not r.answerable]
    n_un = round(n * len(unanswerable) / len(records))
    return rng.sample(answerable, n - n_un) + rng.sample(unanswerable, n_un)


@dataclass
class Run:
    """One (variant, layout, retrieval) configuration and what it produced."""

    variant: str
    layout: str  # "template" or "plain"
    retrieval: bool
    numeric: str = "fp32"  # numeric path of the model (pipeline/numeric.py)
    answers: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    seconds_per_answer: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        name = f"{self.variant} / {self.layout} / {'rag' if self.retrieval else 'no-rag'}"
        return name if self.numeric == "fp32" else f"{name} / {self.numeric}"


def evaluate(artifacts, records, retriever, settings: EvalSettings, perplexity_texts: list[str]) -> list[Run]:
    from pipeline.answerability import served_threshold
    from pipeline.copying import load_selector
    from pipeline.numeric import load_variant, to_numeric_path
    from pipeline.scoring import text_perplexity

    passages = [retriever.search(retrieval_query(r.question, r.history)) for r in records]
    runs: list[Run] = []
    reader = None
    built = [v for v in settings.variants if v == "base" or artifacts.meta(v) is not None]
    if settings.extractive_baseline:
        from pipeline.evaluation.baselines import extractive_answer

        run = Run("extractive", "sentence", True)
        run.answers = [extractive_answer(r.question, p) for r, p in zip(records, passages)]
        score_rows(run, records, passages)
        runs.append(run)
    for variant in built:
        model, tokenizer = load_variant(artifacts, variant)
        threshold = served_threshold(artifacts, variant) if settings.decide else None
        selector = load_selector(artifacts.dir(variant)) if settings.copy_decoding else None
        configs = [("copy", True, "fp32")] if selector else []
        if not selector or variant in settings.free_decoding_variants:
            configs.insert(0, ("template", True, "fp32"))
        if variant in settings.no_retrieval_variants:
            configs.append(("template", False, "fp32"))
        if variant == "base" and settings.plain_layout_for_base:
            configs.append(("plain", True, "fp32"))
        if variant in settings.numeric_path_variants:
            configs += [("template", True, path) for path in settings.numeric_paths if path != "fp32"]
        perplexity, copied = None, None  # the copy row, its prompts and candidates, for best-of-n
        for layout, use_retrieval, numeric in configs:
            run = Run(variant, layout, use_retrieval, numeric)
            prompts = []
            for record, found in zip(records, passages):
                shown = found if use_retrieval else []
                prompts.append(build_plain_messages(record.question, shown) if layout == "plain"
                               else build_messages(record.question, shown, record.history))
            weights = numeric.removesuffix(LOOKUP_SUFFIX)
            answer_model = (model if weights == "fp32" or numeric.startswith(ENGINE_PREFIXES)
                            else to_numeric_path(copy.deepcopy(model), weights))
            run.extra["refusal_threshold"] = threshold if layout == "template" else None
            if layout == "copy":
                if reader is None and selector.reads_reader:
                    from pipeline.reader import Reader

                    reader = Reader(artifacts.require("reader"))
                cands = copy_and_score(run, model, tokenizer, retriever.embedder, reader, selector, prompts,
                                       records, passages)
                copied = run, prompts, cands
            elif numeric.startswith(ENGINE_PREFIXES):
                engine_and_score(run, artifacts, model, tokenizer, prompts, records, passages, settings)
            else:
                answer_and_score(run, answer_model, tokenizer, prompts, records, passages, settings)
            if layout != "plain" and use_retrieval and numeric == "fp32" and perplexity is None:
                perplexity = text_perplexity(model, tokenizer, perplexity_texts)  # once per model
                run.extra["perplexity"] = perplexity
            log.info("%s: %s", run.name, aggregate(run.rows))
            runs.append(run)
        if copied and variant in settings.best_of_n_variants and settings.best_of_n:
            copy_run, prompts, cands = copied
            runs += best_of_n_runs(artifacts, variant, selector, cands, copy_run.seconds_per_answer, prompts,
                                   records, passages, settings.best_of_n)
        del model
    return runs


def answer_and_score(run: Run, model, tokenizer, prompts, records, passages, settings: EvalSettings) -> None:
    from pipeline.generation import generate_batch

    from pipeline.generation import LOOKUP_TOKENS

    lookup = run.numeric.endswith(LOOKUP_SUFFIX)
    started = time.time()
    run.answers = generate_batch(model, tokenizer, prompts, settings.max_new_tokens,
                                 1 if lookup else settings.batch_size, desc=run.name,
                                 refusal_threshold=run.extra.get("refusal_threshold"),
                                 lookup_tokens=LOOKUP_TOKENS if lookup else 0)
    run.seconds_per_answer = (time.time() - started) / max(1, len(records))
    score_rows(run, records, passages)


def engine_and_score(run: Run, artifacts, model, tokenizer, prompts, records, passages,
                     settings: EvalSettings) -> None:
    """Another engine's path: onnxruntime-genai (``ort-int4``, ``ort-int8``, ``ort-fp32``;
    pipeline/ort_genai.py) or CTranslate2 (``ct2-int8``, ``ct2-float32``; pipeline/engines.py),
    converted from the variant (cached), deciding with the fp32 model."""
    from pipeline import engines, ort_genai

    precision = run.numeric.split("-", 1)[1]
    if run.numeric.startswith("ort-"):
        generator = ort_genai.OrtGenerator(ort_genai.converted(artifacts, run.variant, precision))
    else:
        generator = engines.Ct2Generator(engines.ct2_converted(artifacts, run.variant, precision), tokenizer)
    started = time.time()
    run.answers = engines.engine_answers(generator, model, tokenizer, prompts, settings.max_new_tokens,
                                         run.extra.get("refusal_threshold"), desc=run.name)
    run.seconds_per_answer = (time.time() - started) / max(1, len(records))
    score_rows(run, records, passages)


def copy_and_score(run: Run, model, tokenizer, embedder, reader, selector, prompts, records, passages) -> list:
    """Copy decoding's replies; returns the featurised candidates they were chosen from."""
    from pipeline.copying import featurize_all

    started = time.time()
    cands = featurize_all(model, tokenizer, embedder, reader, prompts, selector.reads_model, desc=run.name)
    run.answers = [selector.reply(c) for c in cands]
    run.seconds_per_answer = (time.time() - started) / max(1, len(records))
    score_rows(run, records, passages)
    return cands


def best_of_n_runs(artifacts, variant, selector, cands, copy_seconds: float, prompts, records, passages,
                   ns: list[int]) -> list[Run]:
    """One row per n > 1: the reward model's choice among the selector's n best sentences
    (``cands``: the copy row's featurised candidates, which took ``copy_seconds`` an answer)."""
    from pipeline.best_of_n import best_of_n_answers
    from pipeline.training import load_reward_model

    if artifacts.meta("reward") is None:
        log.warning("best-of-n skipped: the reward stage is not built")
        return []
    scorer, score_tokenizer = load_reward_model(artifacts)
    started = time.time()
    answers = best_of_n_answers(selector, scorer, score_tokenizer, prompts, cands, sorted(set(ns)),
                                desc=f"{variant} best-of-n")
    runs = []
    for n in sorted(n for n in set(ns) if n > 1):
        run = Run(variant, f"best-of-{n}", True, answers=answers[n])
        run.seconds_per_answer = copy_seconds + (time.time() - started) / max(1, len(records))  # all n together
        score_rows(run, records, passages)
        log.info("%s: %s", run.name, aggregate(run.rows))
        runs.append(run)
    return runs


def score_rows(run: Run, records, passages) -> None:
    """Per-answer metrics of ``run.answers``; passages count only when the run retrieved."""
    run.rows = [score_answer(a, r, p if run.retrieval else []) for a, r, p in zip(run.answers, records, passages)]
