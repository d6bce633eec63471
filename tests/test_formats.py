"""SEQ INT2 and INT4 formats: levels, round-to-nearest, and the straight-through gradients."""

import pytest
import torch

from upq_hf import formats


def paretoq_seq(w, delta, eps=0.01):
    """ParetoQ's SEQ quantizer written as in the paper, per row (UPQ.md)."""
    return delta * (torch.round(2 * torch.clamp(w / delta, -1 + eps, 1 - eps) - 0.5) + 0.5) / 2


def test_seq_rtn_matches_paretoq_formula_per_row():
    torch.manual_seed(0)
    w = torch.randn(8, 48)
    qw = formats.quantize_seq(w, group_size=None, scale_init="max", scale_dtype=torch.float32)
    assert qw.codes.dtype == torch.uint8 and set(qw.codes.unique().tolist()) <= {0, 1, 2, 3}
    delta = w.abs().amax(dim=1, keepdim=True)
    expected = paretoq_seq(w, delta)
    torch.testing.assert_close(formats.dequantize(qw), expected, rtol=0, atol=1e-6)
    # four levels (k - 1.5) * s with s = Delta / 2 and no zero level
    assert torch.equal(formats.dequantize(qw), (qw.codes.float() - 1.5) * qw.scale)


def test_seq_group_scales_follow_each_group():
    w = torch.zeros(2, 8)
    w[0, :4] = torch.tensor([1.0, -1.0, 0.5, 0.0])
    w[0, 4:] = torch.tensor([8.0, 4.0, -8.0, 2.0])
    w[1] = torch.arange(8.0) - 4
    qw = formats.quantize_seq(w, group_size=4, scale_init="max", scale_dtype=torch.float32)
    # s = max|w| / 2 per group of 4 columns
    torch.testing.assert_close(qw.scale, torch.tensor([[0.5, 4.0], [2.0, 1.5]]))
    # 8.0 with s = 4: 2u - 0.5 = 2 * 0.99 - 0.5 -> round 1 -> code 3 -> 4 * 1.5 = 6
    assert formats.dequantize(qw)[0, 4].item() == 6.0
    assert formats.dequantize(qw)[0, 6].item() == -6.0


def test_fake_quant_seq_forward_equals_rtn():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    scale = formats.seq_init_scale(w, 32, "mse", torch.float32)
    qw = formats.quantize_seq(w, 32, scale=scale, scale_dtype=torch.float32)
    torch.testing.assert_close(formats.fake_quant_seq(w, scale, 32), formats.dequantize(qw), rtol=0, atol=0)


def test_fake_quant_seq_gradients_match_definition():
    # one row, per-row scale s = 1 (Delta = 2): clip range |w| < 2 * (1 - eps) = 1.98
    w = torch.tensor([[0.3, -0.7, 1.2, 2.5, -3.0, 0.0]], requires_grad=True)
    s = torch.tensor([[1.0]], requires_grad=True)
    q = formats.fake_quant_seq(w, s, None)
    # forward: codes round(w / s - 0.5) + 2 clipped to 0..3
    assert q.detach().tolist() == [[0.5, -0.5, 1.5, 1.5, -1.5, 0.5]]
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    q.backward(upstream)
    inside = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(w.grad, upstream * inside)
    # dq/ds = (k - 1.5) - w / s inside the clip range, (k - 1.5) outside
    dq_ds = torch.tensor([[0.5 - 0.3, -0.5 + 0.7, 1.5 - 1.2, 1.5, -1.5, 0.5 - 0.0]])
    torch.testing.assert_close(s.grad, (upstream * dq_ds).sum(dim=1, keepdim=True))


def test_int4_rtn_error_and_codes():
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    for init in ("max", "mse"):
        qw = formats.quantize_int4(w, 64, scale_init=init, scale_dtype=torch.float32)
        assert int(qw.codes.max()) <= 15 and int(qw.zero.min()) >= 0 and int(qw.zero.max()) <= 15
        assert torch.equal(qw.zero, qw.zero.round())
    qmax = formats.quantize_int4(w, 64, scale_init="max", scale_dtype=torch.float32)
    err = (formats.dequantize(qmax) - w).abs()
    # min/max range: every weight is within half a step of its level
    step = formats._expand(qmax.scale, 64, 128)
    assert bool((err <= step / 2 + 1e-6).all())
    qmse = formats.quantize_int4(w, 64, scale_init="mse", scale_dtype=torch.float32)
    assert ((formats.dequantize(qmse) - w) ** 2).sum() < ((formats.dequantize(qmax) - w) ** 2).sum()


def test_mse_init_never_worse_than_max_for_seq():
    torch.manual_seed(3)
    w = torch.randn(32, 128) * torch.rand(32, 1)
    for group in (None, 32):
        e_max = ((formats.dequantize(formats.quantize_seq(w, group, scale_init="max")) - w) ** 2).sum(1)
        e_mse = ((formats.dequantize(formats.quantize_seq(w, group, scale_init="mse")) - w) ** 2).sum(1)
        assert bool((e_mse <= e_max + 1e-6).all())
        assert e_mse.sum() < 0.9 * e_max.sum()


def test_fake_quant_int4_forward_equals_rtn_and_passes_gradients():
    torch.manual_seed(4)
    w = torch.randn(8, 64, requires_grad=True)
    s, z = formats.int4_init_params(w.detach(), 32, "max", torch.float32)
    s.requires_grad_(True)
    q = formats.fake_quant_int4(w, s, z, 32)
    rtn = formats.dequantize(formats.quantize_int4(w.detach(), 32, scale=s, zero=z, scale_dtype=torch.float32))
    torch.testing.assert_close(q.detach(), rtn, rtol=0, atol=1e-6)
    q.sum().backward()
    assert w.grad is not None and s.grad is not None and s.grad.abs().sum() > 0


def test_scales_are_rounded_to_storage_dtype_before_coding():
    torch.manual_seed(5)
    w = torch.randn(4, 64)
    qw = formats.quantize_seq(w, 32, scale_init="max", scale_dtype=torch.float16)
    assert qw.scale.dtype == torch.float16
    # codes are what RTN gives for the stored (fp16) scale
    assert torch.equal(qw.codes, formats.seq_codes(w, qw.scale.float(), 32))


@pytest.mark.parametrize("bad", [0, -8, 3.5, True])
def test_bad_group_size_is_rejected(bad):
    with pytest.raises(ValueError, match="group_size"):
        formats.quantize(torch.randn(4, 64), 2, bad)


def test_group_size_that_does_not_divide_names_layer_and_allowed_values():
    with pytest.raises(ValueError, match=r"does not divide in_features=576 of model.layers.0.q.*64"):
        formats.check_group_size(576, 128, layer="model.layers.0.q")


def test_wrong_bits_rejected():
    with pytest.raises(ValueError, match=r"bits must be one of \[2, 4\], got 3"):
        formats.quantize(torch.randn(4, 64), 3, 32)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mse_search_picks_the_scale_of_the_best_round_trip(bits, group_size, dtype):
    """The in-place search chooses, per group, the candidate whose quantize -> dequantize round trip has the
    least squared error (the first on ties), bit for bit: checked against that round trip done the plain way."""
    torch.manual_seed(3)
    w = (torch.randn(48, 128) * torch.rand(48, 1)).to(dtype)
    w[0, :7] = 0
    wf = w.float()
    n_groups = 1 if group_size is None else 128 // group_size
    best_err = torch.full((48, n_groups), float("inf"))
    if bits == 2:
        delta = formats._grouped(wf, group_size).abs().amax(-1)
        best = delta / 2
        for alpha in formats._MSE_GRID.tolist():
            s = formats._round_scale(alpha * delta / 2, torch.float16)
            q = formats.dequantize_seq(formats.seq_codes(w, s, group_size), s, group_size)
            err = (formats._grouped(q - wf, group_size) ** 2).sum(-1)
            best = torch.where(err < best_err, s, best)
            best_err = torch.minimum(err, best_err)
        assert torch.equal(formats.seq_init_scale(w, group_size, "mse"), best)
    else:
        g = formats._grouped(wf, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        best_s, best_z = formats.int4_params_from_range(lo, hi, torch.float16)
        for alpha in formats._MSE_GRID.tolist():
            s, z = formats.int4_params_from_range(alpha * lo, alpha * hi, torch.float16)
            q = formats.dequantize_int4(formats.int4_codes(w, s, z, group_size), s, z, group_size)
            err = (formats._grouped(q - wf, group_size) ** 2).sum(-1)
            best_s = torch.where(err < best_err, s, best_s)
            best_z = torch.where(err < best_err, z, best_z)
            best_err = torch.minimum(err, best_err)
        scale, zero = formats.int4_init_params(w, group_size, "mse")
        assert torch.equal(scale, best_s) and torch.equal(zero, best_z)
