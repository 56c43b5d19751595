"""The ``int8-decode`` numeric path (pipeline/numeric.py): full-precision weights for the prompt
(bf16 where the CPU multiplies bf16 natively, else fp32), int8 weights for decode steps: one
activation scale per row of a step, whether the row feeds one token or a token and its prompt
lookup guesses (up to ``DECODE_TOKENS``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.cpu import has_int8_dot_product, has_native_bf16


# Calls of at most this many tokens a row are decode steps (one token, or one and 15 prompt
# lookup guesses: pipeline/generation.py) and run in int8; longer ones read a prompt. On a
# 2-core EPYC with AVX-512 and VNNI one 16-token row through a 576 x 1536 layer took 0.034 ms in
# int8 against 0.12 ms in bf16 and 0.24 ms in fp32 (session 16, exploration microbenchmark).
DECODE_TOKENS = 16


class PrefillDecodeLinear(torch.nn.Module):
    """A linear layer with two copies of its weight: ``prefill_dtype`` (a bf16 copy with native
    bf16, else the layer's own fp32 weight) for calls longer than ``DECODE_TOKENS`` (the prompt),
    int8 per output channel for shorter ones (decode steps).

    Input ``(..., T, in)``, output ``(..., T, out)`` in the input's dtype. In int8 each row of a
    batch is quantised on its own (fbgemm's dynamic linear takes one activation scale per call),
    so an answer generated in a batch matches the same answer generated alone; a row's fed
    tokens (its next token and its prompt lookup guesses) share that row's scale.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.prefill_dtype = torch.bfloat16 if has_native_bf16() else torch.float32
        if self.prefill_dtype == torch.float32:
            # the loaded weight itself: no second fp32 copy, and a tied lm_head keeps sharing
            # the embedding's (113 MB on SmolLM2-135M)
            self.weight, self.bias = linear.weight, linear.bias
        else:
            self.register_buffer("weight", weight.to(self.prefill_dtype))
            self.bias = None if linear.bias is None else linear.bias.detach().to(torch.float32, copy=True)
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
        zero = torch.zeros_like(scale, dtype=torch.long)
        qweight = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None if self.bias is None else self.bias.detach())
        self._reduce_range = not has_int8_dot_product()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] > DECODE_TOKENS:
            out = F.linear(x.to(self.prefill_dtype), self.weight).to(x.dtype)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        rows = x.float().reshape(-1, x.shape[-2], x.shape[-1]).unbind(0)
        # All 8 bits for the activation where the CPU has VNNI; 7 bits where it has only AVX2,
        # whose int16 pair sums saturate on full-range inputs (pipeline/cpu.py).
        out = [torch.ops.quantized.linear_dynamic(row, self._packed, reduce_range=self._reduce_range)
               for row in rows]
        return torch.cat(out).reshape(*x.shape[:-1], -1).to(x.dtype)


def replace_linears(model: torch.nn.Module, wrap) -> torch.nn.Module:
    """Every ``nn.Linear`` of ``model`` (the tied ``lm_head`` included) replaced, in place, by
    ``wrap(linear)``, which keeps the linear's own weight or makes what it keeps.

    The loaded weights are views of one copy-on-write mapping of the safetensors file, and
    merging the LoRA adapters wrote into it. While any tensor views the mapping (the fp32
    embedding does), none of its pages are returned: measured on the quick sft, the service
    kept 0.3 GB of fp32 linear weights it no longer used. So where a wrapper drops a loaded
    weight (a bf16 prompt copy replaces the fp32 one), every loaded tensor that stays (the
    embedding, the norms) is copied into memory of its own; where every loaded tensor stays
    (an fp32 prompt), nothing is copied."""
    loaded = list(model.parameters()) + list(model.buffers())
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, wrap(child))
    now = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    kept = [t for t in loaded if id(t) in now]
    if len(kept) < len(loaded):
        with torch.no_grad():
            for tensor in kept:
                tensor.data = tensor.data.clone()
    return model
