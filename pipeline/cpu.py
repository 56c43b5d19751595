"""What this CPU offers the numeric paths: read once from /proc/cpuinfo (Linux) or torch."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def features() -> dict[str, bool]:
    """Each feature the numeric paths care about, present or not."""
    flags = cpu_flags()
    return {name: name in flags for name in FEATURES}


def has_int8_dot_product() -> bool:
    """VNNI (AVX-512 or AVX) multiplies u8 x s8 into int32 directly. Without it fbgemm's AVX2
    kernel adds pairs of u8 x s8 products in int16, which saturates unless activations keep
    to 7 bits (PyTorch's reduce_range=True). ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` (fbgemm picks
    its kernels from the CPU, not from ``ATEN_CPU_CAPABILITY``) runs those AVX2 kernels here."""
    flags = cpu_flags()
    fbgemm_capped = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() == "AVX2"
    return ("avx512_vnni" in flags or "avx_vnni" in flags) and not fbgemm_capped


def capped_to_avx2() -> bool:
    """Whether PyTorch's kernels are capped below AVX-512 by environment variables
    (``ATEN_CPU_CAPABILITY=avx2`` for ATen, ``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN, whose
    kernels run bf16 matrix multiplies), as a run standing in for an AVX2-only CPU sets them."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return aten in ("default", "avx2") or onednn in ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def has_native_bf16() -> bool:
    """bf16 matrix multiplies in hardware (AVX-512 BF16 or AMX) that the kernels may use. Without
    them, or with the kernels capped to AVX2, PyTorch emulates bf16 and a bf16 prefill is several
    times slower than fp32."""
    flags = cpu_flags()
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and not capped_to_avx2()


def describe() -> str:
    """One line naming the CPU model, its relevant features and the vector instructions
    PyTorch's kernels use (capped below the CPU's by ``ATEN_CPU_CAPABILITY=avx2``, as a run
    standing in for an AVX2-only CPU does), for reports."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    present = [f for f, on in features().items() if on]
    try:
        import torch

        kernels = f"; PyTorch kernels: {torch.backends.cpu.get_cpu_capability()}"
    except ImportError:
        kernels = ""
    return f"{name} ({', '.join(present) or 'no AVX2'}{kernels})"
