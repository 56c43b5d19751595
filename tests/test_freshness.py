"""Fingerprints follow the code a stage imports, and never depend on where the checkout lives.

Each test works on a copy of the project in a temporary folder and runs the copy's own
`python -m pipeline status` in a subprocess: nothing is stubbed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.freshness import code_files, stale_reasons

ROOT = Path(__file__).resolve().parent.parent
# Write meta.json for every stage as if it had just been built, with the fingerprint the
# runner computes now: the state a real `make pipeline` leaves, without the hours of training.
MARK_BUILT = """
import sys
from pipeline import runner
from pipeline.artifacts import Artifacts, fingerprint
from pipeline.config import load_config
from pipeline.stages import REGISTRY
cfg = load_config("quick", ["paths.artifacts=" + sys.argv[1]])
artifacts = Artifacts(cfg.paths.resolve("artifacts"))
for name in REGISTRY:
    parts = runner.current_parts(cfg, name, artifacts)
    artifacts.dir(name).mkdir(parents=True, exist_ok=True)
    Artifacts.write_meta(artifacts.dir(name), {"stage": name, "fingerprint": fingerprint(name, parts),
                                               "fingerprint_parts": parts})
"""


def _copy_project(dest: Path) -> Path:
    for part in ("pipeline", "service", "configs", "data"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _python(checkout: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, *args], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _states(status: str) -> dict[str, str]:
    rows = status.split("\n\n")[0].splitlines()[1:]
    return {row.split()[0]: row.split()[1] for row in rows}


@pytest.fixture
def built_copy(tmp_path):
    checkout = _copy_project(tmp_path / "clone-a")
    artifacts = tmp_path / "artifacts"
    _python(checkout, "-c", MARK_BUILT, str(artifacts))
    return checkout, artifacts


def test_stages_follow_the_modules_they_import():
    sft = {path.relative_to(ROOT).as_posix() for path in code_files("pipeline.stages.sft").values()}
    assert {"pipeline/stages/sft.py", "pipeline/training.py", "pipeline/prompt.py"} <= sft
    evaluate = {path.name for path in code_files("pipeline.stages.evaluate").values()}
    assert {"metrics.py", "normalize.py", "loop.py", "prompt.py"} <= evaluate
    assert "ppo_math.py" in {path.name for path in code_files("pipeline.stages.ppo").values()}
    assert "prompt.py" not in {path.name for path in code_files("pipeline.stages.base").values()}


def test_training_stages_do_not_depend_on_the_serving_numeric_paths():
    """int8-decode and the other inference paths (pipeline/numeric.py) serve and evaluate a
    trained variant; no training stage runs them, so editing them must not make a trained (or
    shipped) adapter stale."""
    serving = {"pipeline.numeric", "pipeline.int8_decode"}
    for stage in ("reader", "dataset", "sft", "reward", "dpo", "ppo"):
        assert not serving & set(code_files(f"pipeline.stages.{stage}")), stage
    assert serving <= set(code_files("pipeline.stages.evaluate")), "eval scores the numeric paths"


def test_editing_prompt_py_makes_seven_stages_stale_and_names_the_file(built_copy):
    checkout, artifacts = built_copy
    status = _python(checkout, "-m", "pipeline", "status", f"paths.artifacts={artifacts}")
    assert set(_states(status).values()) == {"built"}, status

    prompt = checkout / "pipeline" / "prompt.py"
    prompt.write_text(prompt.read_text() + "\n# an edit\n")
    status = _python(checkout, "-m", "pipeline", "status", f"paths.artifacts={artifacts}")
    states = _states(status)
    stale = {name for name, state in states.items() if state == "stale"}
    assert stale == {"reader", "dataset", "sft", "reward", "dpo", "ppo", "eval"}, status
    assert states["base"] == states["index"] == "built"
    why = dict(line.split(" is stale: ") for line in status.split("\n\n")[1].splitlines())
    for name in ("reader", "dataset", "sft", "dpo", "ppo", "eval"):
        assert "code pipeline/prompt.py changed" in why[name], why[name]
    assert "parent sft is stale" in why["reward"] and "prompt.py" not in why["reward"]  # imports none


def test_a_second_clone_sees_the_same_artifacts_as_built(built_copy, tmp_path):
    _, artifacts = built_copy
    other = _copy_project(tmp_path / "somewhere" / "else" / "clone-b")
    status = _python(other, "-m", "pipeline", "status", f"paths.artifacts={artifacts}")
    assert set(_states(status).values()) == {"built"}, status


def test_stale_reasons_name_config_inputs_parents_and_code():
    old = {"config": "a", "inputs": {"data/qa/train.jsonl": "1"}, "parents": {"base": "x"},
           "code": {"pipeline/prompt.py": "p", "pipeline/stages/sft.py": "s"}}
    new = {"config": "b", "inputs": {"data/qa/train.jsonl": "2"}, "parents": {"base": "y"},
           "code": {"pipeline/prompt.py": "q", "pipeline/stages/sft.py": "s", "pipeline/new.py": "n"}}
    assert stale_reasons(old, new) == ["config changed", "input data/qa/train.jsonl changed",
                                       "parent base changed", "code pipeline/new.py added",
                                       "code pipeline/prompt.py changed"]
    assert stale_reasons(old, old) == []
