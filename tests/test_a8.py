"""The ``"a8"`` backend: upq_hf's CPU kernel with int8 activations (upq_hf/csrc/upq_cpu.c, AVX512-VNNI).

Each row's activations are quantized per weight group, ``q = clamp(rint(x * (127 / amax)), -127, 127)`` and
``sx = amax / 127`` in fp32 (``amax = max |x|`` over the group), and per group and output the kernel adds
``s * sx * (sum c q - z * sum q)``. The integer sums are exact, so against :func:`int8_product` (the same
formula in float64 from the same ``q``) the only error is fp32 arithmetic:

    |y - int8_product| <= (G + 5) u32 sum_g |s| sx (|sum c q| + |z| |sum q|) (+ |bias| u32) + u_out |y|

(per group: the int32 sum's conversion to fp32 (exact below 2^24, i.e. groups under about 8,800 columns), the
zero-point term, the scale product and the running sum round once each; the bias once; the output once). Against the exact product with the unrounded activations, the int8 rounding
adds at most ``sum_k |w_k| sx_g / 2`` (a rounding error of half a step per element; a clamp never cuts, since
``|x| * 127 / amax <= 127``).

The kernel tests need a CPU with AVX512-VNNI and skip elsewhere; the fallback (the exact avx2 kernel) and the
backend plumbing are tested on every machine.
"""

from __future__ import annotations


import pytest
import torch

from upq_hf import UPQConfig, UPQLinear, avx2, formats
from upq_hf.backends import resolve_backend

from helpers import check_gradients_take_the_reference_path, whole_model_on
from helpers import run_on as run
from helpers import upq_layer as layer
from test_avx2 import CASES, UNIT_ROUNDOFF, U32, exact_and_bound

needs_vnni = pytest.mark.skipif(not (avx2.available() and avx2.kernel().a8),
                                reason="this CPU has no AVX512-VNNI (the a8 kernel's instructions)")


def quantize_activations(x: torch.Tensor, group: int):
    """The kernel's int8 activations, computed with the same fp32 operations: (q, sx) per row and group."""
    rows, k = x.shape
    xg = x.float().reshape(rows, k // group, group)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.tensor(127.0) / amax
    inv = torch.where((amax > 0) & inv.isfinite(), inv, torch.zeros_like(amax))  # a tiny group: all zero
    q = torch.round(xg * inv).clamp(-127, 127)  # round half to even, as rintf
    return q, (amax / torch.tensor(127.0)).squeeze(-1)


def int8_product(module: UPQLinear, x: torch.Tensor, out_dtype: torch.dtype):
    """float64 ``sum_g s sx (sum c q - z sum q)`` (+ bias) from the kernel's int8 activations, and the fp32
    bound of the module docstring."""
    k = module.in_features
    group = module.group_size or k
    xr = x.reshape(-1, k)
    q, sx = quantize_activations(xr, group)
    q, sx = q.double(), sx.double()  # (rows, G, group), (rows, G)
    qw = module.quantized_weight()
    codes = qw.codes.double().reshape(module.out_features, k // group, group)  # (N, G, group)
    scale = qw.scale.double().reshape(module.out_features, -1)  # (N, G)
    zero = torch.full_like(scale, 1.5) if module.bits == 2 else qw.zero.double().reshape(module.out_features, -1)
    dots = torch.einsum("rgk,ngk->rng", q, codes)  # exact integers
    qsum = q.sum(-1)  # (rows, G)
    terms = scale[None] * sx[:, None, :] * (dots - zero[None] * qsum[:, None, :])
    y = terms.sum(-1)
    magnitude = (scale.abs()[None] * sx[:, None, :] * (dots.abs() + zero.abs()[None] * qsum.abs()[:, None, :])).sum(-1)
    bound = (k // group + 5) * U32 * magnitude
    if module.bias is not None:
        y = y + module.bias.double()
        bound = bound + U32 * (y.abs() + module.bias.double().abs())
    bound = (bound + UNIT_ROUNDOFF[out_dtype] * y.abs()) * (1 + 8 * U32)
    # the int8 rounding against the exact product: half a step per element, times |w|
    w = module.dequantize(torch.float64).abs()  # (N, K)
    steps = formats._expand(sx, group, k)  # (rows, K)
    rounding = 0.5 * steps @ w.t()
    shape = (*x.shape[:-1], module.out_features)
    return y.reshape(shape), bound.reshape(shape), rounding.reshape(shape)


@needs_vnni
@pytest.mark.parametrize("bits,group_size,in_features,out_features", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_int8_product_and_the_exact_product_within_the_derived_bounds(bits, group_size, in_features,
                                                                                  out_features, dtype):
    module = layer(bits, group_size, in_features, out_features)
    module.to(dtype)  # bias in the activation dtype, scales stay float16
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 17, avx2.MAX_ROWS):  # every row count of a pass, and several passes
        x = torch.randn(rows, in_features).to(dtype)
        y = run(module, x, "a8")
        assert y.dtype == dtype and y.shape == (rows, out_features)
        expected, bound, rounding = int8_product(module, x, dtype)
        excess = (y.double() - expected).abs() - bound
        assert excess.max() <= 0, f"rows={rows}: {excess.max():.3g} over the fp32 bound"
        exact, exact_bound = exact_and_bound(module, x, dtype)
        assert ((y.double() - exact).abs() <= rounding + bound + exact_bound).all()


@needs_vnni
def test_its_error_is_the_int8_rounding_and_no_more():
    """On the bundled model's down_proj shape the error against the exact product is a few tenths of a percent,
    several times the exact kernel's, and well inside the int8 bound (which holds per output)."""
    module = layer(2, 64, 1536, 576)
    module.to(torch.bfloat16)
    x = torch.randn(8, 1536, dtype=torch.bfloat16)
    exact, _ = exact_and_bound(module, x, torch.bfloat16)
    _, _, rounding = int8_product(module, x, torch.bfloat16)
    a8_error = (run(module, x, "a8").double() - exact).norm() / exact.norm()
    avx2_error = (run(module, x, "avx2").double() - exact).norm() / exact.norm()
    assert avx2_error < a8_error < 0.01
    assert a8_error < 0.2 * (rounding.norm() / exact.norm())  # the worst case is far from the typical one


@needs_vnni
def test_a_zero_row_gives_the_bias_and_scalars_are_exact_integers():
    module = layer(4, 64, 128, 40)  # 8 outputs past the last block of 32: the scalar tail too
    x = torch.zeros(2, 128)
    x[1, 5] = 3.0  # one element per group: q = 127 exactly, sx = 3 / 127
    y = run(module, x, "a8")
    assert torch.equal(y[0], module.bias.float())
    expected, bound, _ = int8_product(module, x, torch.float32)
    assert ((y.double() - expected).abs() <= bound).all()
    exact, exact_bound = exact_and_bound(module, x, torch.float32)
    # 3 * 127 / 3 is 127 in fp32 and back: the int8 activation of this row is exact
    assert ((y[1].double() - exact[1]).abs() <= bound[1] + exact_bound[1]).all()


@needs_vnni
def test_three_dimensional_and_non_contiguous_inputs():
    module = layer(2, 64, 128, 64)
    x = torch.randn(2, 3, 256)[..., ::2]
    y = run(module, x, "a8")
    assert y.shape == (2, 3, 64) and torch.equal(y, run(module, x.contiguous(), "a8"))
    expected, bound, _ = int8_product(module, x.contiguous(), torch.float32)
    assert ((y.double() - expected).abs() <= bound).all()


@needs_vnni
def test_it_takes_prefill_and_gradients_take_the_reference_path(monkeypatch):
    """Unlike the exact kernels the int8 kernel takes any number of rows (it is faster than dequantize + matmul at
    every row count measured); a call that needs a gradient for x takes the reference path and gets the exact
    gradient; a bias alone needing a gradient still runs the kernel, and the gradient reaches the bias."""
    module = layer(2, 64, 128, 32)
    calls = []
    compiled = avx2.kernel()

    class Spy:
        path, a8 = compiled.path, True

        def linear_a8(self, *args):
            calls.append(args[2])  # rows
            return compiled.linear_a8(*args)

        def linear(self, *args):
            raise AssertionError("the a8 backend ran the exact kernel on a CPU with AVX512-VNNI")

    monkeypatch.setattr(avx2, "kernel", lambda: Spy())
    monkeypatch.setattr(avx2, "has_op", lambda: False)  # the ctypes calls, which the spy counts (same routing)
    x = torch.randn(4 * avx2.MAX_ROWS + 3, 128)
    y = run(module, x, "a8")
    assert calls == [x.shape[0]]
    expected, bound, _ = int8_product(module, x, torch.float32)
    assert ((y.double() - expected).abs() <= bound).all()
    check_gradients_take_the_reference_path(module, "a8", calls)


def test_without_vnni_the_calls_run_on_the_exact_kernel(monkeypatch):
    """Forced where the CPU lacks AVX512-VNNI (every machine can stand in for one), a8 gives the avx2 kernel's
    exact numbers, and the C entry refuses with its status rather than running an illegal instruction."""
    compiled = avx2.kernel()
    module = layer(2, 64, 256, 64)
    x = torch.randn(5, 256)
    expected = run(module, x, "avx2")
    monkeypatch.setattr(compiled, "a8", False)
    assert torch.equal(run(module, x, "a8"), expected)
    if not avx2.cpu_flags() or "avx512_vnni" not in avx2.cpu_flags():
        y = torch.empty(5, 64)
        assert compiled.linear_a8(x.data_ptr(), 0, 5, 256, module.weight.data_ptr(), 64, 2, 64,
                                  module.weight_scale.data_ptr(), None, 2, None, 0, y.data_ptr(), 0, 1) == 3


def test_forcing_the_backend_and_a_clear_error_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("UPQ_BACKEND", raising=False)
    x = torch.randn(2, 128)
    assert resolve_backend(x, "a8") == "a8"
    monkeypatch.setenv("UPQ_BACKEND", "a8")
    assert resolve_backend(x, None) == "a8"
    assert UPQConfig(backend="a8").backend == "a8"
    monkeypatch.setattr(avx2.kernel(), "a8", False)
    with pytest.raises(ImportError, match=r"UPQConfig\(backend='a8'\) needs a CPU with AVX512-VNNI"):
        UPQConfig(backend="a8").check_backend()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_automatic_choice_never_takes_it(monkeypatch, dtype):
    """Not exact, so never chosen for the user: every row count goes elsewhere unless a8 is asked for."""
    monkeypatch.delenv("UPQ_BACKEND", raising=False)
    for rows in (1, 2, 8, 128, 129, 512):
        assert resolve_backend(torch.randn(rows, 64, dtype=dtype), None) != "a8"


@needs_vnni
def test_a_whole_model_on_the_backend(tiny_llama_dir, tmp_path):
    """A tiny random Llama on a8 against the reference: logits within 3% (relative norm: the int8 rounding of
    each layer's input, about 0.5%, through seven quantized layers a block), saved and reloaded unchanged."""
    logits, expected = whole_model_on("a8", tiny_llama_dir, tmp_path / "saved")
    error = ((logits - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.03


@needs_vnni
@pytest.mark.parametrize("bits,group_size", [(2, None), (4, None)])
def test_one_group_per_row_on_the_vector_path(bits, group_size):
    """K = 128 with one scale per row: the 16-at-a-time quantization over the whole row."""
    module = layer(bits, group_size, 128, 40)
    x = torch.randn(5, 128)
    expected, bound, _ = int8_product(module, x, torch.float32)
    assert ((run(module, x, "a8").double() - expected).abs() <= bound).all()


@needs_vnni
@pytest.mark.parametrize("bits,group_size", [(2, 64), (4, 8)])  # the vector and the scalar quantization
def test_a_group_too_small_for_an_int8_scale_counts_as_zero(bits, group_size):
    """0 < max|x| < 127 / FLT_MAX: 127 / max|x| overflows, so the group's int8 values are all zero (its exact
    contribution is below 1e-36) instead of what an infinite factor would make of them."""
    module = layer(bits, group_size, 128, 32, bias=False)
    x = torch.randn(2, 128)
    x[1] = 0.0
    x[1, ::2] = 1e-38 * torch.sign(torch.randn(64))  # every group tiny, half its entries zero
    y = run(module, x, "a8")
    expected, bound, _ = int8_product(module, x, torch.float32)
    assert ((y.double() - expected).abs() <= bound).all()
    assert torch.equal(y[1], torch.zeros(32))  # not the +-127 an infinite factor makes of 1e-38 and of 0


@needs_vnni
@pytest.mark.parametrize("bits,group_size", [(2, 64), (4, 8)])  # the vector and the scalar quantization
def test_inf_and_nan_activations_run_on_the_exact_kernel(bits, group_size):
    """No int8 scale represents an inf or a NaN: such a call runs on the exact kernel, which carries them into the
    outputs instead of turning them into finite numbers."""
    module = layer(bits, group_size, 128, 64)
    x = torch.randn(3, 128)
    x[1, 7] = float("nan")
    x[2, 70] = float("inf")
    y = run(module, x, "a8")
    assert y[0].isfinite().all() and not y[1:].isfinite().any()
    torch.testing.assert_close(y, run(module, x, "avx2"), rtol=0, atol=0, equal_nan=True)
