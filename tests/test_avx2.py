"""The ``"avx2"`` backend (upq_hf's own CPU kernel, upq_hf/csrc/upq_cpu.c via upq_hf/avx2.py).

Tolerance, derived. Per group the kernel computes ``s * (C - z X)`` with ``C = sum_k c_k x_k`` and
``X = sum_k x_k`` summed in fp32 (unit roundoff u = 2**-24) from activations widened exactly, then adds the
groups and the bias in fp32 and rounds the result once to the output dtype (unit roundoff u_y). With
``S = sum_g |s| (sum_k |c_k x_k| + |z| sum_k |x_k|)`` (every term any of those sums adds, in magnitude), each
fp32 sum of n terms errs by at most n u times the sum of its terms' magnitudes, and no sum here has more
than ``K + G + 2`` terms, so ``|y - exact| <= (K + G + 2) u S + u_y |exact|`` to first order; the factor
(1 + 8 u) covers the rest. "exact" is the product with the dequantized weight in float64.

The AVX512-BF16 kernel (several rows, bf16 activations) meets the same bound: codes (0..15) and bf16
activations are exact in bf16, their products exact in fp32, and VDPBF16PS adds them into fp32 sums, a pair at a
time, rounding each addition (it flushes subnormals, which normal data does not reach).
"""

from __future__ import annotations


import pytest
import torch

from upq_hf import UPQConfig, UPQLinear, avx2, formats
from upq_hf.backends import resolve_backend, torch_linear
from upq_hf.machine import cpu_flags

from helpers import check_cpu_kernel_fallbacks
from helpers import run_on as run
from helpers import upq_layer as layer
from helpers import whole_model_on

U32 = 2.0 ** -24
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def test_the_kernel_builds_on_this_machine():
    # CI and the development machines are x86-64 Linux with AVX2 and gcc: the backend must be there
    assert avx2.available(), avx2.unavailable_reason()
    assert avx2.unavailable_reason() is None
    assert avx2.kernel().path.is_file() and avx2.kernel().path.parent.name == "kernels"


def exact_and_bound(module: UPQLinear, x: torch.Tensor, out_dtype: torch.dtype):
    """float64 product with the dequantized weight, and the bound of the module docstring, per output."""
    qw = module.quantized_weight()
    k = module.in_features
    group = module.group_size or k
    xd = x.double().reshape(-1, k)
    w = module.dequantize(torch.float64)
    exact = xd @ w.t()
    if module.bias is not None:
        exact = exact + module.bias.double()
    codes = qw.codes.double()  # (N, K)
    scale = formats._expand(qw.scale.double().abs(), module.group_size, k)  # (N, K)
    zero = 1.5 if module.bits == 2 else formats._expand(qw.zero.double().abs(), module.group_size, k)
    magnitude = xd.abs() @ (scale * codes).t() + xd.abs() @ (scale * zero).t() if module.bits == 4 else \
        xd.abs() @ (scale * codes).t() + 1.5 * (xd.abs() @ scale.t())
    if module.bias is not None:
        magnitude = magnitude + module.bias.double().abs()
    n_terms = k + k // group + 2
    bound = (n_terms * U32 * magnitude + UNIT_ROUNDOFF[out_dtype] * exact.abs()) * (1 + 8 * U32)
    shape = (*x.shape[:-1], module.out_features)
    return exact.reshape(shape), bound.reshape(shape)


CASES = [
    # bits, group_size, in_features, out_features
    (2, 64, 576, 192),    # the bundled model's k/v projections
    (2, 64, 1536, 576),   # its down_proj
    (2, 32, 256, 200),    # out features not a multiple of 32: a scalar tail of 8
    (2, 16, 96, 37),      # the smallest INT2 group, out features not a multiple of 8
    (2, None, 1000, 45),  # one scale per row, K not a multiple of 16: a padded word
    (2, None, 90, 33),
    (4, 64, 576, 192),
    (4, 8, 64, 40),       # the smallest INT4 group
    (4, 128, 512, 96),
    (4, None, 1000, 45),  # K not a multiple of 8
]


@pytest.fixture
def several_rows_kernel(request):
    """Each several-rows kernel in turn: the fp32 FMA one (every AVX2 CPU) and, where the CPU and the compiler
    have it, the AVX512-BF16 one (bf16 activations only); restored afterwards."""
    compiled = avx2.kernel()
    wanted = request.param == "avx512-bf16"
    if wanted and not avx2.bf16_wanted():
        pytest.skip("this CPU has no AVX512-BF16")
    before = compiled.bf16
    assert bool(compiled.set_bf16(int(wanted))) == wanted
    yield request.param
    compiled.set_bf16(int(before))


def test_the_bf16_kernel_is_on_where_the_cpu_has_it(monkeypatch):
    # the compiler of CI and the development machines (gcc 12) knows AVX512-BF16: it is built in, and on
    # when the CPU has the instructions
    assert avx2.kernel().bf16 == avx2.bf16_wanted()
    monkeypatch.setenv("UPQ_CPU_BF16", "0")
    assert not avx2.bf16_wanted()


@pytest.mark.parametrize("bits,group_size,in_features,out_features", CASES)
@pytest.mark.parametrize("dtype,several_rows_kernel", [
    (torch.float32, "fp32-fma"), (torch.bfloat16, "fp32-fma"), (torch.float16, "fp32-fma"),
    (torch.bfloat16, "avx512-bf16"),  # it takes bf16 activations only
], indirect=["several_rows_kernel"])
def test_matches_the_exact_product_within_the_derived_bound(bits, group_size, in_features, out_features, dtype,
                                                           several_rows_kernel):
    module = layer(bits, group_size, in_features, out_features)
    module.to(dtype)  # bias in the activation dtype, scales stay float16
    for rows in (1, 2, 3, 8, avx2.MAX_ROWS):
        x = torch.randn(rows, in_features).to(dtype)
        y = run(module, x, "avx2")
        assert y.dtype == dtype and y.shape == (rows, out_features)
        exact, bound = exact_and_bound(module, x, dtype)
        excess = (y.double() - exact).abs() - bound
        assert excess.max() <= 0, f"rows={rows}: {excess.max():.3g} over the bound"


def test_closer_to_the_exact_product_than_the_reference_path():
    """The reference path rounds the dequantized weight to bf16 before its matmul; the kernel does not."""
    module = layer(2, 64, 1536, 576)
    module.to(torch.bfloat16)
    x = torch.randn(4, 1536, dtype=torch.bfloat16)
    exact, _ = exact_and_bound(module, x, torch.bfloat16)
    kernel_error = (run(module, x, "avx2").double() - exact).abs().mean()
    reference_error = (run(module, x, "torch").double() - exact).abs().mean()
    assert kernel_error < reference_error


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_bf16_and_fp32_scales(scale_dtype):
    for bits in (2, 4):
        module = layer(bits, 64, 256, 64, scale_dtype=scale_dtype)
        x = torch.randn(3, 256)
        exact, bound = exact_and_bound(module, x, torch.float32)
        assert ((run(module, x, "avx2").double() - exact).abs() <= bound).all()


def test_three_dimensional_and_non_contiguous_inputs():
    module = layer(2, 64, 128, 64)
    x = torch.randn(2, 3, 256)[..., ::2]  # (2, 3, 128), not contiguous
    y = run(module, x, "avx2")
    assert y.shape == (2, 3, 64)
    assert torch.equal(y, run(module, x.contiguous(), "avx2"))
    exact, bound = exact_and_bound(module, x.contiguous(), torch.float32)
    assert ((y.double() - exact).abs() <= bound).all()


def test_the_layer_keeps_nothing_beside_its_buffers():
    module = layer(2, 64, 128, 64)
    before = dict(module.__dict__)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    run(module, torch.randn(2, 128), "avx2")
    assert module.__dict__.keys() == before.keys()
    after = module.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_many_rows_and_gradients_take_the_reference_path(monkeypatch):
    module = layer(2, 64, 128, 32)
    calls = []
    compiled = avx2.kernel()

    class Spy:
        path = compiled.path

        def linear(self, *args):
            calls.append(args[2])  # rows
            return compiled.linear(*args)

    monkeypatch.setattr(avx2, "kernel", lambda: Spy())
    monkeypatch.setattr(avx2, "has_op", lambda: False)  # the ctypes calls, which the spy counts (same routing)
    check_cpu_kernel_fallbacks(module, "avx2", avx2.MAX_ROWS, calls)
    assert calls[0] == avx2.MAX_ROWS


@pytest.mark.parametrize("bits,group_size", [(2, 8), (4, 4)])
def test_a_group_that_splits_a_word_takes_the_reference_path(bits, group_size):
    module = layer(bits, group_size, 64, 40)
    assert not avx2.supports(module)
    x = torch.randn(3, 64)
    assert torch.equal(run(module, x, "avx2"), run(module, x, "torch"))
    assert avx2.supports(layer(bits, 2 * 32 // bits, 64, 40))  # whole words per group: taken


def test_avx2_backend_on_another_device_is_an_error():
    module = layer(2, 64, 128, 32)
    module.backend = "avx2"
    with pytest.raises(RuntimeError, match="CPU tensors"):
        module(torch.randn(2, 128, device="meta"))


def test_forcing_the_backend(monkeypatch):
    monkeypatch.delenv("UPQ_BACKEND", raising=False)
    x = torch.randn(2, 128)
    assert resolve_backend(x, "avx2") == "avx2"
    monkeypatch.setenv("UPQ_BACKEND", "avx2")
    assert resolve_backend(x, None) == "avx2"
    assert resolve_backend(x, "torch") == "torch"  # the module's own choice wins over the variable
    assert UPQConfig(backend="avx2").backend == "avx2"


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_the_automatic_choice_on_the_cpu(monkeypatch, fast_bf16):
    from upq_hf import backends, int4pack

    monkeypatch.delenv("UPQ_BACKEND", raising=False)
    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: fast_bf16)
    one, few = torch.randn(1, 1, 128), torch.randn(1, backends.AVX2_FIRST_ROWS + 1, 128)
    assert resolve_backend(one, None) == "avx2"  # a decode step
    expected = "cpu" if fast_bf16 and int4pack.available() else "avx2"
    assert resolve_backend(few, None) == expected
    # bf16 rows go to the AVX512-BF16 kernel where it runs, up to its limit; past it, as fp32 rows do
    bf16_few, bf16_many = few.bfloat16(), torch.randn(backends.AVX2_BF16_ROWS + 1, 128, dtype=torch.bfloat16)
    assert resolve_backend(bf16_few, None) == ("avx2" if avx2.kernel().bf16 else expected)
    assert resolve_backend(bf16_many, None) == expected
    module = layer(2, 64, 128, 32)
    module.backend = None
    with torch.no_grad():
        exact, bound = exact_and_bound(module, one, torch.float32)
        assert ((module(one).double() - exact).abs() <= bound).all()
    monkeypatch.setattr(avx2, "available", lambda: False)  # no kernel of ours: torch's, else the reference
    assert resolve_backend(one, None) == ("cpu" if int4pack.available() else "torch")


def test_no_compiler_means_no_backend_and_a_working_fallback(monkeypatch, tmp_path):
    try:
        with monkeypatch.context() as patch:
            patch.setenv("UPQ_CACHE", str(tmp_path))  # nothing compiled there yet
            patch.setenv("CC", str(tmp_path / "no-such-compiler"))
            avx2._load.cache_clear()
            assert not avx2.available()
            assert "could not build" in avx2.unavailable_reason()
            assert list(tmp_path.rglob("*.so")) == [] and list(tmp_path.rglob(".*tmp*")) == []  # nothing half-made
            module = layer(2, 64, 128, 32)
            x = torch.randn(2, 128)
            assert torch.equal(run(module, x, "avx2"), torch_linear(x, module))  # the reference path, not an error
    finally:
        avx2._load.cache_clear()
    assert avx2.available()


def test_a_compiler_without_avx512_bf16_builds_the_rest(monkeypatch, tmp_path):
    """A compiler that refuses the AVX512-BF16 part (stood in for by a flag it does not know) still gives the
    backend, with the fp32 FMA kernel for every several-rows call."""
    try:
        with monkeypatch.context() as patch:
            patch.setenv("UPQ_CACHE", str(tmp_path))
            patch.setattr(avx2, "BF16_FLAGS", ("-DUPQ_BF16", "-fno-such-option-upq"))
            avx2._load.cache_clear()
            assert avx2.available() and not avx2.kernel().bf16
            module = layer(2, 64, 256, 64)
            module.to(torch.bfloat16)
            x = torch.randn(8, 256, dtype=torch.bfloat16)
            exact, bound = exact_and_bound(module, x, torch.bfloat16)
            assert ((run(module, x, "avx2").double() - exact).abs() <= bound).all()
    finally:
        avx2._load.cache_clear()
    assert avx2.kernel().bf16 == avx2.bf16_wanted()


def test_a_whole_model_on_the_backend_matches_the_reference(tiny_llama_dir, tmp_path):
    logits, expected = whole_model_on("avx2", tiny_llama_dir, tmp_path / "saved")
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_forcing_avx2_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(avx2, "unavailable_reason", lambda: "this CPU lacks avx2")
    with pytest.raises(ImportError, match=r"UPQConfig\(backend='avx2'\) needs upq_hf's AVX2 CPU kernel, which "
                                          r"cannot run here \(this CPU lacks avx2\)"):
        UPQConfig(backend="avx2").check_backend()


@pytest.mark.parametrize("bits,group_size,bias", [(2, 64, True), (4, 32, False)])
def test_the_custom_op_matches_the_kernel_and_its_fake(bits, group_size, bias):
    """``upq_hf::cpu_linear`` (what ``torch.compile`` sees): torch's own checks of a custom op (schema, fake
    tensor, no aliasing) pass, and its result is the eager kernel's, bit for bit."""
    module = layer(bits, group_size, 128, 48, bias=bias)
    x = torch.randn(2, 128)
    args = (x, module.weight, module.weight_scale, getattr(module, "weight_zero", None),
            module.bias.detach() if bias else None, bits, group_size, 128, False)
    torch.library.opcheck(avx2.cpu_linear, args, test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(avx2.cpu_linear(*args), run(module, x, "avx2"))


def test_the_custom_op_hands_an_inf_back_to_the_exact_kernel():
    # the int8 kernel refuses rows with an inf (status 4): the op then runs the exact kernel, as eager does
    module = layer(2, 64, 128, 32)
    x = torch.randn(1, 128)
    x[0, 3] = float("inf")
    args = (x, module.weight, module.weight_scale, None, module.bias.detach(), 2, 64, 128)
    handed_back, exact = avx2.cpu_linear(*args, True), avx2.cpu_linear(*args, False)
    assert handed_back.isnan().any()  # the inf reached the product: not a kernel that zeroed it
    torch.testing.assert_close(handed_back, exact, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(handed_back, run(module, x, "a8"), rtol=0, atol=0, equal_nan=True)  # as eager


@pytest.mark.parametrize("operator", [True, False], ids=["cpp-operator", "python-custom-op"])
def test_a_compiled_decode_step_keeps_the_kernel_without_a_graph_break(monkeypatch, tiny_llama_dir, operator):
    """A whole tiny Llama decode step under ``torch.compile(fullgraph=True)`` (aot_eager: the graph as inductor
    would get it, without its C++ build): it compiles into one graph (a graph break would raise), every UPQ
    layer is one call of the kernel in it (the C++ operator ``upq_cpu::linear`` where it built, else the Python
    custom op ``upq_hf::cpu_linear``), and the logits equal the eager model's bit for bit."""
    from torch._dynamo.backends.debugging import aot_eager
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=UPQConfig(
        bits=2, group_size=32, recipe="rtn", backend="avx2")).eval()
    layers = sum(isinstance(m, UPQLinear) for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    if operator:
        assert avx2.has_op(), avx2._load_op()
        expected = torch.ops.upq_cpu.linear
    else:
        monkeypatch.setattr(avx2, "has_op", lambda: False)
        expected = torch.ops.upq_hf.cpu_linear
    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda i: model(i, use_cache=False).logits, fullgraph=True, backend=keep)
    with torch.no_grad():
        logits = compiled(ids)
    torch._dynamo.reset()
    targets = [node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert len(graphs) == 1
    assert sum(target in (expected, expected.default) for target in targets) == layers
    assert torch.equal(logits, eager)


@pytest.mark.parametrize("bits,group_size,bias", [(2, 64, True), (4, 32, False), (2, None, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_torch_operator_is_the_kernel_bit_for_bit(bits, group_size, bias, dtype):
    """``torch.ops.upq_cpu.linear`` (upq_op.cpp: the kernel behind torch's dispatcher, built on first use) gives
    the ctypes call's result bit for bit, exact and int8 kernels, one row and several; torch's own checks of an
    operator (schema, fake tensor) pass."""
    assert avx2.has_op(), avx2._load_op()
    module = layer(bits, group_size, 128, 48, bias=bias)
    for rows in (1, 5):
        x = torch.randn(rows, 128).to(dtype)
        for int8_activations in (False, True):
            args = (x, module.weight, module.weight_scale, module.weight_zero, module.bias.detach() if bias else None,
                    bits, group_size or 128, 128, int8_activations)
            expected = avx2._run(*args)
            if expected is None:  # the int8 kernel without AVX512-VNNI: the exact one runs it
                expected = avx2._run(*args[:-1], False)
            assert torch.equal(torch.ops.upq_cpu.linear(*args), expected)
    torch.library.opcheck(torch.ops.upq_cpu.linear.default, args, test_utils=("test_schema", "test_faketensor"))


def test_the_torch_operator_hands_an_inf_to_the_exact_kernel():
    module = layer(2, 64, 128, 32)
    x = torch.randn(1, 128)
    x[0, 3] = float("inf")
    args = (x, module.weight, module.weight_scale, None, module.bias.detach(), 2, 64, 128)
    torch.testing.assert_close(torch.ops.upq_cpu.linear(*args, True), avx2._run(*args, False), rtol=0, atol=0,
                               equal_nan=True)


def test_eager_layers_call_the_operator_and_without_it_the_same_numbers(monkeypatch):
    from torch.profiler import profile

    module = layer(2, 64, 128, 32)
    module.backend = "avx2"
    x = torch.randn(1, 128)
    with torch.no_grad(), profile() as prof:
        on_operator = module(x)
    assert any(event.name == "upq_cpu::linear" for event in prof.events())
    monkeypatch.setattr(avx2, "has_op", lambda: False)
    with torch.no_grad(), profile() as prof:
        on_ctypes = module(x)
    assert not any(event.name == "upq_cpu::linear" for event in prof.events())
    assert torch.equal(on_operator, on_ctypes)


def test_no_cpp_compiler_means_no_operator_and_nothing_half_made(monkeypatch, tmp_path):
    monkeypatch.setenv("UPQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        avx2._build_op(avx2.kernel())
    assert list(tmp_path.rglob("*.so")) == [] and list(tmp_path.rglob(".*tmp*")) == []


AVX512 = {"avx512f", "avx512bw"} <= (cpu_flags() or set())  # what the AVX-512 one-row kernel needs


def one_row_on_and_off(switch: str, module, x, bits, group_size, in_features, int8_activations):
    """One-row kernel calls on ``x`` with the loaded kernel's ``switch`` (``"avx512"``, ``"a8_panels"``) on (its
    default, checked) and off: the two outputs. The switch is back on afterwards."""
    compiled = avx2.kernel()
    assert getattr(compiled, switch)
    args = (x, module.weight, module.weight_scale, module.weight_zero, module.bias.detach(), bits,
            group_size or in_features, in_features, int8_activations)
    flip = getattr(compiled, f"set_{switch}")
    try:
        on = avx2._run(*args)
        assert not flip(0)
        off = avx2._run(*args)
    finally:
        flip(1)
    return on, off


@pytest.mark.skipif(not (avx2.available() and AVX512),
                    reason="the AVX-512 one-row kernel needs a CPU with AVX512F/BW")
@pytest.mark.parametrize("bits,group_size,in_features,out_features", [
    (2, 64, 576, 1536), (4, 64, 576, 192), (2, None, 1536, 96), (4, 32, 128, 40), (2, 16, 256, 33), (4, None, 64, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_avx512_one_row_kernel_is_the_avx2_one_bit_for_bit(monkeypatch, bits, group_size, in_features,
                                                               out_features, dtype):
    """One-row calls on AVX512F/BW CPUs take 16-lane vectors with each output's operations in the AVX2 kernel's
    order: the same bits (output counts that are not a multiple of the 32-output block included)."""
    module = layer(bits, group_size, in_features, out_features)
    x = torch.randn(1, in_features).to(dtype)
    wide, narrow = one_row_on_and_off("avx512", module, x, bits, group_size, in_features, False)  # on by default
    assert torch.equal(wide, narrow)
    exact, bound = exact_and_bound(module, x, dtype)
    assert ((wide.double() - exact).abs() <= bound).all()


def test_the_avx512_switch_follows_the_environment(monkeypatch, tmp_path):
    try:
        monkeypatch.setenv("UPQ_CPU_AVX512", "0")
        avx2._load.cache_clear()
        assert avx2.kernel() is not None and not avx2.kernel().avx512
    finally:
        monkeypatch.delenv("UPQ_CPU_AVX512")
        avx2._load.cache_clear()
    assert avx2.kernel().avx512 == AVX512


VNNI = AVX512 and "avx512_vnni" in (cpu_flags() or set())


@pytest.mark.skipif(not avx2.available() or not AVX512, reason="the AVX-512 kernels need a CPU with AVX512F/BW")
def test_the_avx512_kernels_are_built_where_the_cpu_has_them():
    """A compile error in the AVX-512 part of the file makes the loader fall back to the AVX2-only build, silently
    and three times slower on a 1B model's decode step: where the CPU has AVX512F/BW the loaded build must be the
    full one."""
    assert "-DUPQ_BF16" in avx2.kernel().flags
    assert avx2.kernel().avx512


@pytest.mark.skipif(not (avx2.available() and VNNI), reason="the int8 kernel needs a CPU with AVX512-VNNI")
@pytest.mark.parametrize("bits,group_size,in_features,out_features", [
    (2, 64, 576, 1536), (4, 64, 576, 192), (2, None, 1536, 96), (4, 32, 128, 416), (2, 16, 256, 160),
    (4, None, 64, 288), (2, 32, 96, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_one_row_panels_are_the_blocks_bit_for_bit(bits, group_size, in_features, out_features, dtype):
    """One-row int8 calls read panels of 128 outputs with prefetch (a 1B model's decode: 1.7x faster); each output
    sees the 32-output blocks' operations in their order, so the results are the same bits, outputs past the last
    panel and past the last block included."""
    module = layer(bits, group_size, in_features, out_features)
    x = torch.randn(1, in_features).to(dtype)
    panels, blocks = one_row_on_and_off("a8_panels", module, x, bits, group_size, in_features, True)  # on by default
    assert torch.equal(panels, blocks)
    reference = torch.nn.functional.linear(x.double(), module.dequantize(torch.float64), module.bias.double())
    assert (panels.double() - reference).abs().max() < 0.05 * reference.abs().max()
