"""Numeric paths for CPU inference: the same merged model in fp32, bf16 or int8.

``int8`` is PyTorch's dynamic quantisation of every ``nn.Linear``: weights stored as int8,
activations quantised on the fly per batch. No calibration data and no new dependency; on
a 2-core CPU it decodes about twice as fast as fp32 (reports/bench.md). Its quality cost is
measured by the eval stage (the rows marked ``int8`` in reports/eval.md).
"""
from __future__ import annotations

import warnings

from pipeline.errors import UserError

NUMERIC_PATHS = ("fp32", "bf16", "int8")


def to_numeric_path(model, path: str):
    """The model converted for inference (fp32 returns it unchanged; int8 returns a copy)."""
    import torch

    if path not in NUMERIC_PATHS:
        raise UserError(f"numeric path must be one of {', '.join(NUMERIC_PATHS)}, not '{path}'")
    if path == "bf16":
        return model.to(torch.bfloat16)
    if path == "int8":
        # torch.ao.quantization announces its move to torchao (torch is pinned: pyproject.toml)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(deprecated|torchao).*")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model
