"""reports/eval.json, reports/eval.md (table + answers side by side) and a bar chart."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.evaluation.metrics import aggregate, correct
from pipeline.evaluation.stats import paired_bootstrap, sign_test

COLUMNS = [("key_fact_accuracy", "key-fact acc"), ("answer_accuracy", "correct (all)"),
           ("abstention_accuracy", "abstention"), ("false_refusal_rate", "false refusal"),
           ("citation_precision", "citation prec"), ("token_f1", "F1"), ("rouge_l", "ROUGE-L"),
           ("bleu", "BLEU"), ("median_words", "median words"), ("repetition_rate", "repetition"),
           ("perplexity", "held-out ppl"), ("seconds_per_answer", "s/answer")]
# The stage each variant was trained from: its rows are compared with that stage's served row.
PREVIOUS_STAGE = {"sft": "base", "dpo": "sft", "ppo": "sft"}


def previous_rows(key: str, main: dict) -> list[str]:
    """Rows a main row is compared with besides base and extractive: for a best-of-n row, the
    same variant's copy row (best-of-1); for a copy row, the same variant decoding freely; then
    the previous stage's served row (its copy row if scored)."""
    variant, _, layout = key.partition(" ")
    if layout.startswith("best-of-"):
        return [f"{variant} copy"] if f"{variant} copy" in main else []
    rows = [variant] if layout == "copy" and variant in main else []
    stage = PREVIOUS_STAGE.get(variant)
    if stage:
        rows.append(f"{stage} copy" if f"{stage} copy" in main else stage)
    return rows


def row_key(run) -> str | None:
    """The name a main row goes by in comparisons (None: not a main row)."""
    if not run.retrieval or run.numeric != "fp32":
        return None
    if run.layout in ("template", "sentence"):
        return run.variant
    return f"{run.variant} {run.layout}" if run.layout == "copy" or run.layout.startswith("best-of-") else None


def summarise(run) -> dict:
    summary = {"variant": run.variant, "layout": run.layout, "retrieval": run.retrieval, "numeric": run.numeric,
               **aggregate(run.rows), "seconds_per_answer": round(run.seconds_per_answer, 2)}
    for key in ("perplexity", "refusal_threshold"):
        if run.extra.get(key) is not None:
            summary[key] = round(float(run.extra[key]), 4)
    return summary


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def fast_path_costs(runs: list, summaries: list[dict]) -> list[dict]:
    """Each faster numeric path against fp32 for the same variant (template layout, retrieval on):
    key-fact points gained or lost, answer-time speed-up, the share of answers word for word the
    same as fp32's, and the answerable questions whose key-fact hit the path lost or gained
    (with a two-sided sign-test p-value: is the change more than chance?). ``summaries[i]`` is
    ``summarise(runs[i])``."""
    fp32 = {run.variant: (run, s) for run, s in zip(runs, summaries)
            if run.numeric == "fp32" and run.layout == "template" and run.retrieval}
    costs = []
    for run, s in zip(runs, summaries):
        if run.numeric == "fp32" or run.variant not in fp32:
            continue
        reference, ref = fp32[run.variant]
        pairs = [(a["fact_hit"], b["fact_hit"]) for a, b in zip(run.rows, reference.rows) if a["answerable"]]
        lost, gained = sum(b and not a for a, b in pairs), sum(a and not b for a, b in pairs)
        costs.append({"variant": run.variant, "numeric": run.numeric,
                      "key_fact_points": round(100 * (s["key_fact_accuracy"] - ref["key_fact_accuracy"]), 1),
                      "speedup": round(ref["seconds_per_answer"] / max(1e-6, s["seconds_per_answer"]), 2),
                      "same_answers": round(sum(a == b for a, b in zip(run.answers, reference.answers))
                                            / max(1, len(run.answers)), 3),
                      "questions_lost": lost, "questions_gained": gained,
                      "sign_test_p": sign_test(lost, gained)})
    return costs


def comparisons(runs: list, seed: int = 0) -> list[dict]:
    """Paired bootstrap 95% intervals of each main row against base, the extractive baseline
    and ``previous_rows``: key-fact accuracy (answerable questions) and "correct" (all
    questions: the facts when answerable, a refusal when not)."""
    main = {row_key(run): run for run in runs if row_key(run)}
    out = []
    for variant, run in main.items():
        if variant == "extractive":
            continue
        against = [other for other in ("base", "extractive", *previous_rows(variant, main))
                   if other != variant and other in main and not (variant == "base" and other != "extractive")]
        for other in dict.fromkeys(against):
            reference = main[other]
            answerable = [(a["fact_hit"], b["fact_hit"]) for a, b in zip(run.rows, reference.rows) if a["answerable"]]
            overall = [(correct(a), correct(b)) for a, b in zip(run.rows, reference.rows)]
            out.append({"variant": variant, "against": other,
                        "key_fact": paired_bootstrap([float(a) for a, _ in answerable],
                                                     [float(b) for _, b in answerable], seed),
                        "correct": paired_bootstrap([float(a) for a, _ in overall],
                                                    [float(b) for _, b in overall], seed),
                        "questions_gained": sum(a and not b for a, b in answerable),
                        "questions_lost": sum(b and not a for a, b in answerable)})
    return out


def comparison_lines(items: list[dict]) -> list[str]:
    if not items:
        return []

    def interval(c):
        if c["difference"] is None:
            return "–"
        return f"{100 * c['difference']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"

    lines = ["## Paired differences (points, 95% bootstrap interval)", "",
             "Each row against another on the same questions; an interval that excludes 0 is a "
             "difference the question sample supports.", "",
             "| variant | against | key-fact acc | correct (all) | answerable gained / lost |", "|---|---|---|---|---|"]
    lines += [f"| {c['variant']} | {c['against']} | {interval(c['key_fact'])} | {interval(c['correct'])} | "
              f"{c['questions_gained']} / {c['questions_lost']} |" for c in items]
    return lines + [""]


def fast_path_lines(costs: list[dict]) -> list[str]:
    if not costs:
        return []
    lines = ["## Fast numeric paths against fp32", "",
             "Key-fact accuracy change in points (negative = a loss), answer-time speed-up, the share "
             "of answers identical to fp32's, and the answerable questions lost and gained (sign test), "
             "same questions:", ""]
    lines += [f"- `{c['variant']}` {c['numeric']}: {c['key_fact_points']:+.1f} points, {c['speedup']:.2f}x faster, "
              f"{100 * c['same_answers']:.0f}% identical answers, {c['questions_lost']} lost / "
              f"{c['questions_gained']} gained (p = {c['sign_test_p']:.2f})" for c in costs]
    return lines + [""]


def write_report(runs, records, out_dirs: list[Path], header: str, examples: int, seed: int = 0) -> dict:
    summaries = [summarise(run) for run in runs]
    costs = fast_path_costs(runs, summaries)
    paired = comparisons(runs, seed)
    report = {"questions": len(records), "runs": summaries, "comparisons": paired,
              "fast_path_costs": costs, "answers": {
        run.name: [{"id": r.id, "answer": a} for r, a in zip(records, run.answers)] for run in runs}}
    lines = [header, "", "| variant | layout | retrieval | numeric | " + " | ".join(l for _, l in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for s in summaries:
        lines.append(f"| {s['variant']} | {s['layout']} | {'on' if s['retrieval'] else 'off'} | {s['numeric']} | "
                     + " | ".join(_cell(s.get(k)) for k, _ in COLUMNS) + " |")
    lines += ["", "![key metrics](eval.png)", ""] + comparison_lines(paired) + fast_path_lines(costs)
    lines += ["## Answers side by side", ""]
    shown = [r for r in records if r.answerable][: max(0, examples - 1)] + \
            [r for r in records if not r.answerable][:1]
    index = {r.id: i for i, r in enumerate(records)}
    for record in shown:
        lines += [f"**{record.id}**: {record.question}  ", f"_reference_: {record.answer or '(no answer in the documents)'}", ""]
        for run in runs:
            answer = " ".join(run.answers[index[record.id]].split()) or "(empty)"
            lines.append(f"- `{run.name}`: {answer}")
        lines.append("")
    for folder in out_dirs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(report, indent=2))
        (folder / "eval.md").write_text("\n".join(lines) + "\n")
        plot(summaries, folder / "eval.png")
    return report


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["key_fact_accuracy", "abstention_accuracy", "false_refusal_rate", "citation_precision"]
    labels = [f"{s['variant']}/{s['layout'][0]}/{'rag' if s['retrieval'] else 'no'}"
              + ("" if s["numeric"] == "fp32" else f"/{s['numeric']}") for s in summaries]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(summaries)), 4))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(summaries))], [s.get(key) or 0 for s in summaries],
               width, label=key.replace("_", " "))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(summaries))], labels, rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Held-out questions: what each stage bought")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
