"""Numeric paths for CPU inference: the same merged model in fp32, bf16 or int8.

``bf16`` casts the weights (fast on CPUs with AVX512-BF16 or AMX, slow elsewhere). ``int8`` is
PyTorch's dynamic quantisation of every ``nn.Linear``: int8 weights, activations quantised per
batch on the fly, no calibration and no new dependency. Measured on the quick profile
(reports/bench.md, reports/eval.md): int8 decodes ~2x faster than fp32 but loses 24-26 points
of key-fact accuracy on the held-out questions (per-channel weights with an fp32 ``lm_head``
still lost 13 points on sft), so the service defaults to fp32; bf16 gives a ~1.5x faster first
token for -5.3 to +2.6 points.
"""
from __future__ import annotations

import warnings

from pipeline.errors import UserError

NUMERIC_PATHS = ("fp32", "bf16", "int8")


def check_numeric_path(path: str) -> str:
    if path not in NUMERIC_PATHS:
        raise UserError(f"numeric path must be one of {', '.join(NUMERIC_PATHS)}, not '{path}'")
    return path


def to_numeric_path(model, path: str):
    """The model converted for inference (fp32 returns it unchanged; int8 returns a copy)."""
    import torch

    check_numeric_path(path)
    if path == "bf16":
        return model.to(torch.bfloat16)
    if path == "int8":
        # torch.ao.quantization announces its move to torchao (torch is pinned: pyproject.toml)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(deprecated|torchao).*")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model
