"""QATLinear: fake-quant forward, gradients, freezing into UPQLinear and back, whole-model swaps."""

import pytest
import torch
from torch import nn

from upq_hf import formats
from upq_hf.nn import UPQLinear
from upq_hf.qat import QATLinear, freeze_model, qat_layers, to_qat

pytestmark = pytest.mark.usefixtures("one_thread")


FORMATS = [(2, None), (2, 16), (4, 16), (4, None)]


def _linear(seed=0, n_in=64, n_out=48, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def _perturbed(bits, group_size, seed=0):
    """A QATLinear whose parameters have moved away from their RTN start, as after training."""
    layer = QATLinear.from_linear(_linear(seed), bits, group_size)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.weight.add_(0.02 * torch.randn(layer.weight.shape, generator=generator))
        layer.weight_scale.mul_(1 + 0.1 * torch.rand(layer.weight_scale.shape, generator=generator))
        if layer.weight_zero is not None:
            layer.weight_zero.add_(torch.randn(layer.weight_zero.shape, generator=generator))
    return layer


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_frozen_layer_reproduces_fake_quant_forward(bits, group_size, monkeypatch):
    monkeypatch.setenv("UPQ_BACKEND", "torch")  # the reference path is exact; the CPU kernel rounds x to bf16
    layer = _perturbed(bits, group_size)
    frozen = layer.freeze()
    assert isinstance(frozen, UPQLinear) and frozen.bits == bits and frozen.group_size == group_size
    assert frozen.weight_scale.dtype == torch.float16
    # the packed codes and float16 scales stand for exactly the weight the QAT forward pass used
    assert torch.equal(frozen.dequantize(torch.float32), layer.fake_quant_weight().detach())
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(frozen(x), layer(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_qat_start_equals_round_to_nearest(bits, group_size):
    linear = _linear(1)
    for scale_init in ("max", "mse"):
        layer = QATLinear.from_linear(linear, bits, group_size, scale_init)
        rtn = UPQLinear.from_linear(linear, bits, group_size, scale_init)
        assert torch.equal(layer.fake_quant_weight().detach(), rtn.dequantize(torch.float32))
        assert torch.equal(layer.freeze().weight, rtn.weight)


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_gradients_reach_weight_scale_and_zero(bits, group_size):
    layer = _perturbed(bits, group_size)
    x = torch.randn(8, 64)
    target = torch.randn(8, 48)
    nn.functional.mse_loss(layer(x), target).backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.weight_scale.grad is not None and layer.weight_scale.grad.abs().sum() > 0
    assert torch.isfinite(layer.weight_scale.grad).all()
    if bits == 4:
        assert layer.weight_zero.grad is not None and layer.weight_zero.grad.abs().sum() > 0
    # straight through: inside the clipping range the weight gets the dense layer's gradient
    w = layer.weight.detach().clone().requires_grad_(True)
    nn.functional.mse_loss(nn.functional.linear(x, layer.fake_quant_weight().detach() + w - w.detach(),
                                                layer.bias.detach()), target).backward()
    inside = layer.weight.grad != 0
    torch.testing.assert_close(layer.weight.grad[inside], w.grad[inside])


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_int2_forward_recomputes_the_weight_with_autograd_s_numbers(group_size, bias):
    """INT2 QATLinear keeps no fake-quantized weight for the backward pass (it recomputes it); its
    output must equal the plain-autograd path bit for bit and its gradients the autograd ones."""
    layer = _perturbed(2, group_size)
    if not bias:
        layer.bias = None
    with torch.no_grad():  # push some weights past the clipping range, where only the scale learns
        layer.weight[:4].mul_(3)
    x = torch.randn(2, 7, 64, requires_grad=True)
    upstream = torch.randn(2, 7, 48)

    def reference():
        weight = layer.fake_quant_weight()
        return nn.functional.linear(x, weight, layer.bias)

    grads = {}
    for name, fn in (("fused", layer), ("autograd", reference)):
        out = fn(x) if fn is layer else fn()
        params = [x, layer.weight, layer.weight_scale] + ([layer.bias] if bias else [])
        grads[name] = (out.detach(), torch.autograd.grad(out, params, upstream))
    assert torch.equal(grads["fused"][0], grads["autograd"][0])
    for got, want in zip(grads["fused"][1], grads["autograd"][1]):
        assert got.shape == want.shape and got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the backward pass holds x, not a weight-sized tensor: only inputs and parameters are saved
    out = layer(x)
    saved = [t for t in out.grad_fn.saved_tensors]
    assert all(t.data_ptr() in (x.data_ptr(), layer.weight.data_ptr()) or t.numel() == layer.weight_scale.numel()
               for t in saved)


def test_int2_backward_under_bf16_autocast_matches_autograd():
    # autocast runs the forward matmul in bf16 while x stays float32: the recomputing backward must too
    layer = _perturbed(2, 16)
    x = torch.randn(4, 64, requires_grad=True)
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x) if fused else nn.functional.linear(x, layer.fake_quant_weight(), layer.bias)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float().square().sum(), [x, layer.weight, layer.weight_scale])
        assert grads[0].dtype == torch.float32
        results.append((out, grads))
    assert torch.equal(results[0][0], results[1][0])
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits", [2, 4])
def test_a_few_steps_lower_the_output_error(bits):
    # correlated inputs of unequal variance, as in a network (with white inputs RTN is already optimal)
    torch.manual_seed(0)
    teacher = _linear(2)
    mixing = torch.linalg.qr(torch.randn(64, 64))[0]
    x = (torch.randn(256, 64) * torch.logspace(-1, 1, 64)) @ mixing
    layer = QATLinear.from_linear(teacher, bits, 16)
    with torch.no_grad():
        target = teacher(x)
        start = nn.functional.mse_loss(layer(x), target).item()
    optimizer = torch.optim.Adam([{"params": [layer.weight], "lr": 1e-3},
                                  {"params": [layer.weight_scale], "lr": 1e-4}])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 60)
    for _ in range(60):
        loss = nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        end = nn.functional.mse_loss(layer.freeze()(x), target).item()
    assert end < 0.7 * start


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_freeze_round_trip(bits, group_size, monkeypatch):
    monkeypatch.setenv("UPQ_BACKEND", "torch")  # the reference path is exact; the CPU kernel rounds x to bf16
    frozen = _perturbed(bits, group_size).freeze()
    resumed = QATLinear.from_upq_exact(frozen)
    assert (resumed.bits, resumed.group_size, resumed.scale_dtype) == (bits, group_size, torch.float16)
    x = torch.randn(4, 64)
    torch.testing.assert_close(resumed(x), frozen(x), rtol=0, atol=1e-6)
    again = resumed.freeze()
    assert torch.equal(again.weight, frozen.weight)
    assert torch.equal(again.weight_scale, frozen.weight_scale)
    if bits == 4:
        assert torch.equal(again.weight_zero, frozen.weight_zero)
    assert torch.equal(again.bias, frozen.bias)


def test_freeze_to_another_scale_dtype():
    layer = _perturbed(4, 16)
    frozen = layer.freeze(torch.bfloat16)
    assert frozen.weight_scale.dtype == torch.bfloat16 and frozen.weight_zero.dtype == torch.bfloat16
    # codes recomputed for the bfloat16 scales: RTN of the latent weight with those scales
    qw = frozen.quantized_weight()
    expected = formats.dequantize(formats.quantize_int4(layer.weight.detach(), 16, qw.scale, qw.zero))
    assert torch.equal(frozen.dequantize(torch.float32), expected)


@pytest.mark.parametrize("group_size", [None, 16])
def test_from_upq_starts_int2_from_the_dequantized_int4_weight(group_size):
    int4 = UPQLinear.from_linear(_linear(3), bits=4, group_size=16, scale_init="mse")
    int2 = QATLinear.from_upq(int4, bits=2, group_size=group_size, scale_init="mse")
    latent = int4.dequantize(torch.float32)
    assert torch.equal(int2.weight.detach(), latent)
    assert int2.bits == 2 and int2.weight_zero is None
    assert torch.equal(int2.weight_scale.detach(), formats.seq_init_scale(latent, group_size, "mse"))
    assert torch.equal(int2.bias.detach(), int4.bias.detach())
    x = torch.randn(4, 64)
    # the INT2 start is round-to-nearest of the INT4 weight
    rtn = formats.dequantize(formats.quantize(latent, 2, group_size, "mse"))
    torch.testing.assert_close(int2(x), nn.functional.linear(x, rtn, int4.bias), rtol=0, atol=1e-6)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.lm_head = nn.Linear(32, 10)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


def test_model_swaps():
    model = _Tiny()
    x = torch.randn(5, 32)
    names = to_qat(model, bits=4, group_size=16)
    assert names == ["up", "down"] and isinstance(model.lm_head, nn.Linear)
    assert set(qat_layers(model)) == {"up", "down"}
    with torch.no_grad():
        model.up.weight.add_(0.05)
        fake = model(x)
    assert freeze_model(model) == ["up", "down"]
    assert isinstance(model.up, UPQLinear) and isinstance(model.down, UPQLinear)
    torch.testing.assert_close(model(x), fake, rtol=0, atol=1e-5)
    # resume exactly, then progress INT4 -> INT2
    assert to_qat(model) == ["up", "down"]
    torch.testing.assert_close(model(x), fake, rtol=0, atol=1e-5)
    freeze_model(model)
    int4_up = model.up.dequantize(torch.float32)
    to_qat(model, bits=2, group_size=None)
    assert model.up.bits == 2 and model.up.group_size is None
    assert torch.equal(model.up.weight.detach(), int4_up)
    with pytest.raises(ValueError, match="no UPQLinear"):
        to_qat(_Tiny())
