"""onnxruntime-genai as a generation engine for the bench: a variant (LoRA merged) converted to
ONNX once per precision, cached by the variant's fingerprint, and greedy replies from it.

The conversion is onnxruntime-genai's own model builder (``python -m
onnxruntime_genai.models.builder -i <folder> -p int4|int8|fp32 -e cpu``), which reads a local
Hugging Face folder and needs no network. It lives in the optional ``onnx`` extra
(``pip install -e '.[onnx]'``, which `make setup` installs).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

PRECISIONS = ("int4", "int8", "fp32")


def available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def converted(artifacts, variant: str, precision: str, cache_dir: Path | None = None) -> Path:
    """The ONNX folder of ``variant`` at ``precision``, converted now unless the cache (default
    cache/onnx/) holds one for the variant's current fingerprint."""
    from pipeline.engines import cached_conversion

    if precision not in PRECISIONS:
        raise UserError(f"unknown onnxruntime-genai precision '{precision}'; choose from {', '.join(PRECISIONS)}")

    def convert(merged: Path, out: Path, work: Path) -> None:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out),
                   "-p", precision, "-e", "cpu", "-c", str(work / "builder-cache")]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not (out / "genai_config.json").exists():
            raise RuntimeError(f"onnxruntime-genai could not convert {variant} to {precision}:\n{done.stderr[-2000:]}")

    return cached_conversion(artifacts, variant, "onnx", precision, "genai_config.json", convert, cache_dir)


class OrtGenerator:
    """Greedy decoding with an onnxruntime-genai model folder."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self._og, self.model = og, og.Model(str(folder))

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int = 0) -> Iterator[int]:
        """Yield each new token id as it is decoded."""
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False,
                                  min_length=len(prompt_ids) + min_new_tokens)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])
