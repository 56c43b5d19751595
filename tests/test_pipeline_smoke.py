"""The whole pipeline on the tiny profile with the real embedded models (slow: a few minutes)."""
from __future__ import annotations

import json

import pytest

from pipeline.artifacts import Artifacts
from pipeline.config import load_config
from pipeline.runner import run_pipeline, state, status_table
from pipeline.stages import REGISTRY

pytestmark = pytest.mark.slow


def test_tiny_profile_end_to_end(tmp_path):
    cfg = load_config("tiny", [f"paths.artifacts={tmp_path / 'artifacts'}",
                               f"paths.reports={tmp_path / 'reports'}"])
    results = run_pipeline(cfg)
    artifacts = Artifacts(tmp_path / "artifacts")
    assert all(state(cfg, name, artifacts) == "built" for name in REGISTRY), status_table(cfg)
    assert all(metrics is not None for metrics in results.values())

    sft = artifacts.meta("sft")["metrics"]
    assert sft["adapter_chain"] == ["sft"] and sft["held_out_loss"] > 0
    assert artifacts.meta("dpo")["metrics"]["adapter_chain"] == ["sft", "dpo"]
    ppo = artifacts.meta("ppo")["metrics"]
    assert ppo["adapter_chain"] == ["sft", "ppo"] and ppo["steps"] == cfg.ppo.train.steps
    reward = artifacts.meta("reward")["metrics"]
    assert reward["held_out_pairs"] > 0 and reward["held_out_accuracy"] is not None
    assert sft["refusal_threshold"] is not None  # chosen on the dev split
    for variant in ("sft", "dpo", "ppo"):  # each fits its copy-decoding selector on the dev split
        assert (artifacts.dir(variant) / "copying.json").exists(), variant
        assert 0 <= artifacts.meta(variant)["metrics"]["copy_dev_right"] <= 1

    report = json.loads((tmp_path / "reports/eval.json").read_text())
    runs = {(r["variant"], r["layout"], r["retrieval"]) for r in report["runs"]}
    # trained variants are scored as served: copy decoding with the selector fitted on dev
    # and best-of-n: the reward model choosing among sft's copy candidates
    assert runs == {("base", "template", True), ("sft", "copy", True), ("dpo", "copy", True),
                    ("ppo", "copy", True), ("extractive", "sentence", True), ("sft", "best-of-2", True)}
    assert all(r["key_fact_accuracy"] is not None for r in report["runs"])
    assert report["questions"] == cfg.eval.max_questions and report["fast_path_costs"] == []
    compared = {(c["variant"], c["against"]) for c in report["comparisons"]}
    assert {("sft copy", "base"), ("dpo copy", "sft copy"), ("ppo copy", "sft copy"),
            ("dpo copy", "extractive"), ("sft best-of-2", "sft copy")} <= compared
    retrieval = json.loads((tmp_path / "reports/retrieval.json").read_text())
    assert set(retrieval["modes"]) == {"dense", "bm25", "hybrid"}
    for name in ("eval.md", "eval.png", "sft_loss.png", "reward_margins.png", "dpo_curves.png", "ppo_curves.png"):
        assert (tmp_path / "reports" / name).stat().st_size > 500, name

    again = run_pipeline(cfg)
    assert all(metrics is None for metrics in again.values()), "a second run must skip every stage"


def test_chat_answers_from_the_real_base_model(tmp_path):
    """The real base model through the engine: a streamed answer with the right source."""
    from service.engine import Engine, GenerationSettings

    cfg = load_config("tiny", [f"paths.artifacts={tmp_path}", f"paths.reports={tmp_path / 'r'}"])
    run_pipeline(cfg, only="base")
    run_pipeline(cfg, only="index")
    engine = Engine(tmp_path, retrieval=cfg.retrieval)
    reply = engine.answer("Who introduced the Adam optimizer?", settings=GenerationSettings(max_new_tokens=40))
    assert reply.passages[0].doc_id == "adam-optimizer.md"
    assert reply.text.strip() and reply.completion_tokens > 3
