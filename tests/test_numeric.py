"""The numeric paths of pipeline/numeric.py on hand-built layers and a tiny model."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pipeline.errors import UserError  # noqa: E402
from pipeline.int8_decode import DECODE_TOKENS, PrefillDecodeLinear  # noqa: E402
from pipeline.numeric import to_numeric_path  # noqa: E402


def _layer_and_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(64, 32, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=gen) * 0.1)
        linear.bias.copy_(torch.randn(32, generator=gen))
    return linear, gen


def test_prefill_uses_bf16_weights_and_decode_uses_int8():
    linear, gen = _layer_and_inputs()
    layer = PrefillDecodeLinear(linear)
    prompt = torch.randn(1, DECODE_TOKENS + 4, 64, generator=gen)
    with torch.no_grad():
        exact, fast = linear(prompt), layer(prompt)
        dtype = layer.prefill_dtype  # bf16 where the CPU has it natively, else fp32
        bf16 = (prompt.to(dtype) @ linear.weight.to(dtype).T).float() + linear.bias
    torch.testing.assert_close(fast, bf16)  # the prompt goes through the full-precision copy
    assert fast.dtype == torch.float32 and (fast - exact).abs().max() < 0.05
    token = prompt[:, :1]
    with torch.no_grad():
        decoded = layer(token)
    assert not torch.equal(decoded, bf16[:, :1])  # a different kernel: the int8 one
    assert (decoded - exact[:, :1]).abs().max() < 0.05


def test_decode_scales_each_row_on_its_own():
    linear, gen = _layer_and_inputs(1)
    layer = PrefillDecodeLinear(linear)
    quiet = torch.randn(1, 1, 64, generator=gen)
    loud = torch.randn(1, 1, 64, generator=gen) * 100  # an outlier token in the same batch
    with torch.no_grad():
        alone = layer(quiet)
        batched = layer(torch.cat([quiet, loud]))
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=0)


def test_a_lookup_step_runs_in_int8_one_scale_per_row():
    """A decode step that feeds a row its next token and 15 guesses goes through int8, scaled
    per row: another row's outlier does not change it."""
    linear, gen = _layer_and_inputs(3)
    layer = PrefillDecodeLinear(linear)
    quiet = torch.randn(1, DECODE_TOKENS, 64, generator=gen)
    loud = torch.randn(1, DECODE_TOKENS, 64, generator=gen) * 100
    with torch.no_grad():
        exact = linear(quiet)
        full = (quiet.to(layer.prefill_dtype) @ linear.weight.to(layer.prefill_dtype).T).float() + linear.bias
        alone, batched = layer(quiet), layer(torch.cat([quiet, loud]))
    assert not torch.equal(alone, full), "the int8 kernel, not the prompt's"
    assert (alone - exact).abs().max() < 0.05
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=0)


def test_decode_error_is_below_the_dynamic_int8_paths():
    """Per-channel weights and full-range activations beat torch's default dynamic int8 layer
    (per-tensor weights, 7-bit activations) on a token with one outlier channel."""
    linear, gen = _layer_and_inputs(2)
    token = torch.randn(1, 1, 64, generator=gen)
    token[..., 3] = 40.0
    dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear})
    with torch.no_grad():
        exact = linear(token)
        ours = (PrefillDecodeLinear(linear)(token) - exact).abs().mean()
        theirs = (dynamic(token) - exact).abs().mean()
    assert ours < theirs


@pytest.mark.slow
def test_int8_decode_model_generates_like_fp32(served_artifacts):
    """Each decoded token goes through the int8 branch: its logits differ from fp32's (so the
    branch ran) yet correlate above 0.99 with fp32 teacher-forced on the same tokens."""
    from pipeline.artifacts import Artifacts
    from pipeline.training import chain_of, load_causal_lm

    artifacts = Artifacts(served_artifacts)
    fp32, tokenizer = load_causal_lm(artifacts, chain_of(artifacts, "sft"))
    fast, _ = load_causal_lm(artifacts, chain_of(artifacts, "sft"))
    fast = to_numeric_path(fast.eval(), "int8-decode")
    assert type(fast.model.layers[0].mlp.down_proj) is PrefillDecodeLinear
    assert type(fast.lm_head) is PrefillDecodeLinear
    ids = tokenizer("Adam was proposed by", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = fast.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        decoded = torch.stack(out.logits[1:], 1)[0]  # steps 2..8: one-token calls, the int8 branch
        teacher = fp32.eval()(out.sequences[:, :-1]).logits[0, ids.shape[1]:]  # the same positions
    assert decoded.shape == teacher.shape == (7, fp32.config.vocab_size)
    assert not torch.equal(decoded, teacher), "decode steps must run the int8 weights"
    for step in range(7):
        assert torch.corrcoef(torch.stack([decoded[step], teacher[step]]))[0, 1] > 0.99, step


@pytest.mark.slow
@pytest.mark.parametrize("native_bf16", [True, False])
def test_int8_decode_keeps_one_full_precision_copy_of_each_weight(served_artifacts, monkeypatch, native_bf16):
    """With a bf16 prompt the loaded fp32 weights go, and what stays (the embedding) is copied
    out of the loaded file's mapping, so the mapping and the fp32 weights merged into it can be
    returned (0.4 GB on the quick sft). With an fp32 prompt the layers read the loaded weights
    themselves: nothing is copied, and the tied lm_head shares the embedding's (113 MB on
    SmolLM2-135M)."""
    from pipeline import int8_decode
    from pipeline.artifacts import Artifacts
    from pipeline.training import chain_of, load_causal_lm

    monkeypatch.setattr(int8_decode, "has_native_bf16", lambda: native_bf16)
    artifacts = Artifacts(served_artifacts)
    model, _ = load_causal_lm(artifacts, chain_of(artifacts, "sft"))
    assert model.lm_head.weight is model.model.embed_tokens.weight, "the tiny model ties them, as SmolLM2 does"
    loaded = {name: tensor.data_ptr() for name, tensor in model.named_parameters()}
    fast = to_numeric_path(model.eval(), "int8-decode")
    embedding, down = fast.model.embed_tokens.weight, fast.model.layers[0].mlp.down_proj
    if native_bf16:
        assert down.weight.dtype == fast.lm_head.weight.dtype == torch.bfloat16
        assert embedding.data_ptr() != loaded["model.embed_tokens.weight"]
    else:
        assert down.weight.data_ptr() == loaded["model.layers.0.mlp.down_proj.weight"]
        assert fast.lm_head.weight.data_ptr() == embedding.data_ptr() == loaded["model.embed_tokens.weight"]


def test_unknown_path_is_named():
    with pytest.raises(UserError, match="int8-decode"):
        to_numeric_path(None, "fp8")


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, "int8-decode"),
                                             ({"avx2"}, "int8-decode"), ({"sse4_2"}, "fp32")])
def test_the_served_default_follows_the_cpu(monkeypatch, flags, expected):
    """int8-decode wherever fbgemm has int8 kernels (AVX2 and up); fp32 elsewhere."""
    from pipeline import cpu
    from pipeline.numeric import served_default

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert served_default() == expected


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}])
def test_kernels_capped_to_avx2_read_prompts_in_fp32(monkeypatch, env):
    """A CPU with AVX-512 BF16 whose kernels are capped to AVX2 emulates bf16: int8-decode then
    reads prompts in fp32, not bf16."""
    from pipeline import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}))
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    assert cpu.has_native_bf16() and PrefillDecodeLinear(torch.nn.Linear(8, 4)).prefill_dtype == torch.bfloat16
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not cpu.has_native_bf16() and PrefillDecodeLinear(torch.nn.Linear(8, 4)).prefill_dtype == torch.float32


def test_fbgemm_capped_to_avx2_keeps_activations_to_7_bits(monkeypatch):
    """fbgemm picks its kernels from the CPU; FBGEMM_ENABLE_INSTRUCTIONS=AVX2 runs its AVX2 ones,
    whose int16 pair sums saturate on 8-bit activations."""
    from pipeline import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    assert cpu.has_int8_dot_product() and not PrefillDecodeLinear(torch.nn.Linear(8, 4))._reduce_range
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    assert not cpu.has_int8_dot_product() and PrefillDecodeLinear(torch.nn.Linear(8, 4))._reduce_range


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_holes_the_allocator_kept():
    """Freed blocks between live ones stay resident until trimmed (what a model conversion
    leaves behind); release_freed_memory hands them back."""
    import numpy as np

    from pipeline.bench.memory import status_mb
    from pipeline.numeric import release_freed_memory

    blocks = [np.ones(8 * 1024) for _ in range(4000)]  # 64 KB each: heap, not mmap
    del blocks[::2]  # 125 MB of holes between live blocks
    held = status_mb()["rss_mb"]
    release_freed_memory()
    assert held - status_mb()["rss_mb"] > 80, "the holes stayed resident"
    assert sum(b[0] for b in blocks) == len(blocks)


@pytest.mark.parametrize("flags, native", [({"avx2", "avx512f", "avx512_bf16"}, True), ({"avx2"}, False)])
def test_an_fp32_model_scores_in_bf16_only_where_the_cpu_has_it(monkeypatch, flags, native):
    """Copy decoding's likelihood runs an fp32 model in bf16 autocast on a CPU with native bf16
    (a matrix product then comes out in bf16), in fp32 elsewhere; a model on another numeric path
    is left alone."""
    from pipeline import cpu
    from pipeline.scoring import scoring_precision

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    linear, gen = _layer_and_inputs()
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad(), scoring_precision(linear):
        assert linear(x).dtype == (torch.bfloat16 if native else torch.float32)
    half = torch.nn.Linear(64, 32).to(torch.bfloat16)
    with torch.no_grad(), scoring_precision(half):
        assert not torch.is_autocast_enabled("cpu")
