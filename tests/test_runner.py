"""The stage runner: fingerprints, atomic publish, status, and clear errors."""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.artifacts import Artifacts, MissingArtifact
from pipeline.config import CONFIG_DIR, ConfigError, load_config, parse_override
from pipeline.stages import REGISTRY


def _built(cfg, name):
    return runner.run_pipeline(cfg, only=name)[name] is not None


def test_every_shipped_profile_loads():
    profiles = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {p.stem for p in profiles} >= {"tiny", "quick", "full"}
    for path in profiles:
        assert load_config(path.stem).profile == path.stem


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'base\.modle'"):
        load_config("tiny", ["base.modle=x"])
    with pytest.raises(ConfigError, match="unknown config key 'nosuchstage'"):
        load_config("tiny", ["nosuchstage.x=1"])


def test_override_types_are_checked():
    assert parse_override("a.b.c=8") == {"a": {"b": {"c": 8}}}
    with pytest.raises(ConfigError, match="seed: expected int"):
        load_config("tiny", ["seed=abc"])
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        load_config("nope")


def test_broken_profile_file_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken.yaml").write_text("base: [unclosed\n")
    monkeypatch.setattr("pipeline.config.CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config("broken")


def test_base_stage_builds_once_and_reruns_on_change(tiny_config, tiny_model_dir):
    cfg = tiny_config()
    assert _built(cfg, "base")
    folder = Path(cfg.paths.artifacts) / "base"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert (folder / "chat_template.jinja").exists() or "chat_template" in (
        folder / "tokenizer_config.json").read_text()
    assert runner.state(cfg, "base", Artifacts(cfg.paths.artifacts)) == "built"
    assert not _built(cfg, "base"), "an up-to-date stage must be skipped"
    assert runner.run_pipeline(cfg, only="base", force=True)["base"] is not None

    changed = tiny_config("base.dtype=bfloat16")
    assert runner.state(changed, "base", Artifacts(cfg.paths.artifacts)) == "stale"
    assert _built(changed, "base")


def test_input_file_change_makes_stage_stale(tiny_config, tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, copy)
    cfg = tiny_config(f"base.model={copy}")
    _built(cfg, "base")
    artifacts = Artifacts(cfg.paths.artifacts)
    assert runner.state(cfg, "base", artifacts) == "built"
    (copy / "generation_config.json").write_text('{"do_sample": false}')
    assert runner.state(cfg, "base", artifacts) == "stale"


@dataclasses.dataclass
class _ChildConfig:
    factor: int = 1


def _child_module(calls):
    def run(config, ctx):
        calls.append(config.factor)
        (ctx.out_dir / "child.txt").write_text(str(config.factor))
        return {"factor": config.factor}

    return types.SimpleNamespace(Config=_ChildConfig, PARENTS=("base",), inputs=lambda cfg: [],
                                 run=run, __name__="child")


def test_parent_change_reruns_child(tiny_config, monkeypatch):
    calls = []
    child = _child_module(calls)
    monkeypatch.setitem(REGISTRY, "child", child)
    cfg = tiny_config()
    cfg.child = _ChildConfig()

    def both(config):
        runner.run_pipeline(config, only="base")
        runner.run_pipeline(config, only="child")

    both(cfg)
    both(cfg)
    assert calls == [1], "nothing changed, so the child must not rerun"
    runner.run_pipeline(cfg, only="base", force=True)  # same inputs: same fingerprint
    both(cfg)
    assert calls == [1]
    changed = tiny_config("base.dtype=bfloat16")
    changed.child = _ChildConfig()
    both(changed)
    assert calls == [1, 1], "a rebuilt parent with a new fingerprint must rerun its child"
    changed.child.factor = 2
    both(changed)
    assert calls == [1, 1, 2], "a config change must rerun the child"


def test_failed_stage_keeps_previous_artifact(tiny_config, monkeypatch):
    cfg = tiny_config()
    _built(cfg, "base")
    folder = Path(cfg.paths.artifacts) / "base"
    before = (folder / "meta.json").read_text()

    def explode(config, ctx):
        (ctx.out_dir / "model.safetensors").write_text("half written")
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(REGISTRY["base"], "run", explode)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        runner.run_pipeline(cfg, only="base", force=True)
    assert (folder / "meta.json").read_text() == before
    assert (folder / "model.safetensors").stat().st_size > 1000
    assert not any(p.name.startswith(".base") for p in folder.parent.iterdir())


def test_missing_parent_says_what_to_run(tiny_config, monkeypatch):
    monkeypatch.setitem(REGISTRY, "child", _child_module([]))
    cfg = tiny_config()
    cfg.child = _ChildConfig()
    with pytest.raises(MissingArtifact, match="run: python -m pipeline run --only base"):
        runner.run_pipeline(cfg, only="child")


def test_cli_errors_are_one_line(capsys):
    from pipeline.cli import main

    assert main(["run", "--only", "nosuchstage", "--profile", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown stage 'nosuchstage'; stages are: " + ", ".join(REGISTRY)


def test_status_lists_every_stage(tiny_config):
    cfg = tiny_config()
    _built(cfg, "base")
    table = runner.status_table(cfg)
    assert table.splitlines()[1].split()[:2] == ["base", "built"]
    assert len(table.splitlines()) == len(REGISTRY) + 1
