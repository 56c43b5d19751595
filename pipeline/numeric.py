"""Numeric paths for CPU inference: the same merged model in fp32, bf16, int8 or int8-decode.

- ``bf16`` casts the weights (native on CPUs with AVX512-BF16 or AMX; elsewhere still a faster
  prefill, since the weights read from memory are half the size).
- ``int8`` is PyTorch's dynamic quantisation of every ``nn.Linear``: int8 weights, activations
  quantised on the fly with one scale per call (and 7-bit, ``reduce_range``). Over a 600-token
  prompt that one scale is set by a few outlier activations (largest at the ``down_proj``
  inputs, as LLM.int8() describes), so prompts lose precision: 24-26 key-fact points on the
  held-out questions (reports/eval.md).
- ``int8-decode`` keeps what makes int8 fast and drops what makes it lossy: the prompt (prefill)
  runs through full-precision weights (bf16 where the CPU multiplies bf16 natively, fp32
  elsewhere: emulated bf16 is slower than fp32), and each decode step through int8
  per-channel weights with its activations quantised per row: a row's next token, with its
  prompt lookup guesses when it has them (at most 16 tokens, pipeline/int8_decode.py), shares
  one scale, so a long prompt's outliers never set it. The activation uses all 8 bits only where the CPU has VNNI;
  on AVX2 alone fbgemm sums u8 x s8 pairs in int16, which saturates on full-range inputs, so
  7 bits are used there (pipeline/cpu.py). The earlier measurement of this path on an AVX2
  CPU (-2.3 key-fact points, reports/int8-decode-check/) ran with 8 bits, saturating.
"""
from __future__ import annotations

from contextlib import contextmanager

import warnings

from pipeline.errors import UserError

NUMERIC_PATHS = ("fp32", "bf16", "int8", "int8-decode")


def check_numeric_path(path: str) -> str:
    if path not in NUMERIC_PATHS:
        raise UserError(f"numeric path must be one of {', '.join(NUMERIC_PATHS)}, not '{path}'")
    return path


def served_default() -> str:
    """The numeric path ``python -m service --numeric auto`` (its default) serves on this CPU.

    int8-decode wherever fbgemm has int8 kernels (x86 with AVX2): its prompt runs in bf16 where
    the CPU multiplies bf16 natively and in fp32 elsewhere, its decode steps in int8 (8-bit
    activations with VNNI, 7-bit on AVX2 alone). With its prompt lookup steps in int8 it kept
    fp32's key facts on all 225 held-out questions with AVX-512 and VNNI (0.376 against 0.354,
    5 lost / 9 gained, reports/eval-int8-steps) and with every kernel capped to AVX2,
    fbgemm's too (reports/eval-int8-steps-avx2), and answered sooner than fp32 with prompt
    lookup on both (reports/bench-answers-int8-steps, reports/bench-answers-avx2-int8). fp32
    elsewhere."""
    from pipeline import cpu

    return "int8-decode" if cpu.features()["avx2"] else "fp32"


def load_variant(artifacts, variant: str, numeric: str = "fp32"):
    """(model, tokenizer) of a variant, in eval mode: the base weights with every LoRA adapter
    of the variant merged in (none for "base"), then converted to the numeric path
    (``to_numeric_path``). The one loader eval, the engine, the bench and calibration use."""
    from pipeline.training import chain_of, load_causal_lm

    if variant != "base" and artifacts.meta(variant) is None:
        raise UserError(f"variant '{variant}' is not built; run: python -m pipeline run --only {variant}")
    model, tokenizer = load_causal_lm(artifacts, chain_of(artifacts, variant) if variant != "base" else [])
    return to_numeric_path(model.eval(), numeric), tokenizer


def to_numeric_path(model, path: str):
    """The model converted for inference (fp32 returns it unchanged; the others convert in place
    or return a converted model: pass a copy to keep the original)."""
    import torch

    check_numeric_path(path)
    if path == "bf16":
        return model.to(torch.bfloat16)
    if path == "int8":
        # torch.ao.quantization announces its move to torchao (torch is pinned: pyproject.toml)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(deprecated|torchao).*")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if path == "int8-decode":
        from pipeline.int8_decode import PrefillDecodeLinear, replace_linears

        model = replace_linears(model, PrefillDecodeLinear)
        release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Hand memory that was freed but kept by glibc's allocator back to the system.

    Converting a model frees its fp32 weights in pieces, between new allocations, and glibc
    keeps most such holes for reuse: after int8-decode's conversion and a few answers, 0.18 GB
    of the service's resident memory was free memory held this way. Answers leave such holes
    too, so the engine calls this after each one (1-10 ms). Other C libraries: no-op."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Intra-op threads for the decode steps of the service's batcher (pipeline/batching.py). 0: the
# steps are model calls like any other, run with every thread on the one thread that serves
# them (pipeline/model_calls.py). 1: each worker runs its own steps with one thread, which
# starts no OpenMP region. Before one thread served the model calls, one thread was the faster
# choice in a worker (a 576x1536 int8 linear on one token: 34 us with one thread, 98 us with
# two, against 31 us from the main thread). Since, on a 2-core AMD EPYC (AVX-512, bf16) with
# prompt lookup and two workers, steps on the serving thread answered eight clients at p50
# 3.4 and 3.8 s in two runs against 5.5 and 5.2 s, and one client at 0.67 and 0.58 s against
# 0.69 and 0.77 s (docs/results.md, speed).
DECODE_THREADS = 0
# Decode workers of the service's batcher: each decodes its own batch of up to max_batch /
# workers rows (pipeline/batching.py). Two on that 2-core EPYC, with prompt lookup
# (int8-decode) and steps on the serving thread: eight clients got 61.2 tokens/s in all against
# 43.5 with one worker, at p50 3.4 s against 6.8 s; one client alike (docs/results.md, speed).
DECODE_WORKERS = 2


def use_threads(count: int) -> None:
    """Give this thread ``count`` intra-op threads. A thread's first torch call takes the count
    last set anywhere (torch keeps one process-wide value for threads yet to start), which is
    a decode worker's one during its steps; threads that serve requests set theirs first."""
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


@contextmanager
def intra_op_threads(count: int | None):
    """Run the block with ``count`` intra-op threads on this thread (torch.set_num_threads;
    OpenMP's count is per thread), then restore the count before. None or 0: leave it."""
    import torch

    if not count:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
