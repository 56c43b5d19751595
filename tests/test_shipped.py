"""The adapters shipped for the first `make chat`: installed only where a stage is not built."""
from __future__ import annotations

import json

import pytest

from pipeline.artifacts import Artifacts
from pipeline.freshness import stale_reasons
from service import __main__ as service_main


def test_shipped_adapters_fill_only_missing_stages(tmp_path, monkeypatch):
    shipped = tmp_path / "adapters"
    for stage in ("sft", "dpo"):
        (shipped / stage / "adapter").mkdir(parents=True)
        (shipped / stage / "meta.json").write_text(json.dumps({"stage": stage, "fingerprint": f"shipped-{stage}"}))
    monkeypatch.setattr(service_main, "SHIPPED", shipped)
    artifacts = Artifacts(tmp_path / "artifacts")
    artifacts.dir("dpo").mkdir(parents=True)
    artifacts.write_meta(artifacts.dir("dpo"), {"stage": "dpo", "fingerprint": "trained-here"})
    assert service_main.choose_variant("auto", artifacts) == "dpo"
    assert service_main.install_shipped(artifacts) == ["sft"]
    assert artifacts.meta("sft")["fingerprint"] == "shipped-sft" and (artifacts.dir("sft") / "adapter").is_dir()
    assert artifacts.meta("dpo")["fingerprint"] == "trained-here", "a built stage is never replaced"
    assert service_main.install_shipped(artifacts) == []
    assert service_main.choose_variant("auto", artifacts) == "sft"
    assert service_main.choose_variant("base", artifacts) == "base"


def test_the_shipped_sft_adapter_is_complete():
    folder = service_main.SHIPPED / "sft"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["stage"] == "sft" and meta["metrics"]["adapter_chain"] == ["sft"]
    assert (folder / "adapter" / "adapter_model.safetensors").stat().st_size > 1_000_000
    curve = json.loads((folder / "answerability.json").read_text())
    assert curve["curve"] and curve["dev_rows"] > curve["dev_silent"] > 0
    from pipeline.copying import load_selector

    selector = load_selector(folder)
    assert selector is not None and "reader_score" in selector.features, "copy decoding ships with sft"
    assert len(selector.sentence.weights) == len(selector.features)


def test_the_shipped_adapters_match_the_code_config_and_data_they_were_trained_from(tmp_path):
    """`make pipeline` keeps a shipped stage only while its fingerprint is the one the runner
    computes now. An edit to code the stage (or a parent) runs, to its config or to its data
    makes it stale, and this fails: retrain it and ship the result (adapters/README.md)."""
    import subprocess
    import sys

    from tests.test_freshness import MARK_BUILT, ROOT

    done = subprocess.run([sys.executable, "-c", MARK_BUILT, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("reader", "sft"):
        shipped = json.loads((service_main.SHIPPED / stage / "meta.json").read_text())
        now = json.loads((tmp_path / stage / "meta.json").read_text())
        assert shipped["fingerprint"] == now["fingerprint"], (stage, stale_reasons(shipped["fingerprint_parts"],
                                                                                     now["fingerprint_parts"]))


def test_the_chat_builds_the_reader_only_for_a_variant_that_reads_it(tmp_path, monkeypatch):
    """The reader is built when a variant's copy decoding reads it; serving your own documents
    then still builds the project index, which the reader learns from."""
    import shutil

    from pipeline.config import load_config

    built = []
    monkeypatch.setattr("pipeline.runner.run_pipeline", lambda cfg, only: built.append(only))
    monkeypatch.setattr(service_main, "install_shipped", lambda artifacts: [])
    cfg = load_config("tiny", [f"paths.artifacts={tmp_path}"])
    artifacts = Artifacts(tmp_path)
    service_main.ensure_built(cfg, no_build=False, need_index=False)
    assert built == ["base"], "no variant reads the reader: your own documents need no project index"
    shutil.copytree(service_main.SHIPPED / "sft", artifacts.dir("sft"))  # its selector reads the reader
    built.clear()
    service_main.ensure_built(cfg, no_build=False, need_index=False)
    assert built == ["base", "index", "reader"]
    for stage in ("base", "reader"):
        artifacts.dir(stage).mkdir(parents=True)
        artifacts.write_meta(artifacts.dir(stage), {"stage": stage, "fingerprint": "x"})
    built.clear()
    service_main.ensure_built(cfg, no_build=False, need_index=False)
    assert built == []
    service_main.ensure_built(cfg, no_build=False, need_index=True)
    assert built == ["index"]


@pytest.mark.slow
def test_the_shipped_reader_is_a_small_adapter_that_reads():
    """The reader ships as a LoRA adapter on the embedded MiniLM (no 88 MB model, no training
    on the first chat), and it ranks the sentence that answers first."""
    from pipeline.reader import ADAPTER_DIR, Reader

    folder = service_main.SHIPPED / "reader"
    assert json.loads((folder / "meta.json").read_text())["stage"] == "reader"
    size = (folder / ADAPTER_DIR / "adapter_model.safetensors").stat().st_size
    assert 500_000 < size < 5_000_000, size
    question = "Which optimiser keeps running averages of the gradient and its square?"
    sentences = ["Adam keeps running averages of the gradient and of its square, per parameter.",
                 "Dropout sets a random share of activations to zero during training.",
                 "The learning rate is often warmed up over the first steps."]
    scores = Reader(folder).scores(question, sentences, ["Optimisers > Adam", "Regularisation > Dropout",
                                                         "Optimisers > Schedules"])
    assert scores.argmax() == 0 and scores[0] > max(scores[1:]) + 1.0, scores
