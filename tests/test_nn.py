"""UPQLinear: built from nn.Linear, exact torch (reference) forward, no dequantized weight kept alive.
The CPU backend's agreement with this reference is tested in test_int4pack.py."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upq_hf import UPQLinear, formats


@pytest.mark.parametrize("bits,group", [(2, None), (2, 32), (4, 32), (4, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_equals_linear_on_dequantized_weight(bits, group, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    layer = UPQLinear.from_linear(linear, bits, group, scale_init="mse", backend="torch").to(dtype)
    x = torch.randn(3, 5, 96, dtype=dtype)
    expected = F.linear(x, layer.dequantize(dtype), layer.bias)
    assert torch.equal(layer(x), expected)
    assert layer(x).dtype == dtype and layer(x).shape == (3, 5, 40)


def test_dequantize_matches_formats_and_buffers_are_packed():
    torch.manual_seed(1)
    linear = nn.Linear(64, 24, bias=False)
    qw = formats.quantize(linear.weight.detach(), 2, 32)
    layer = UPQLinear.from_quantized(qw)
    assert layer.weight.dtype == torch.int32 and layer.weight.shape == (4, 24)
    assert layer.weight_scale.shape == (2, 24) and layer.weight_zero is None
    assert torch.equal(layer.codes(), qw.codes)
    assert torch.equal(layer.dequantize(torch.float32), formats.dequantize(qw))
    assert [name for name, _ in layer.named_buffers()] == ["weight", "weight_scale"]


def test_to_dtype_keeps_codes_and_scales():
    layer = UPQLinear.from_linear(nn.Linear(32, 8), 4, 16)
    before = layer.weight.clone(), layer.weight_scale.clone()
    layer = layer.to(torch.bfloat16)
    # .to(dtype) would round fp16 scales through bf16: they keep their storage dtype instead
    assert layer.weight.dtype == torch.int32 and torch.equal(layer.weight, before[0])
    assert layer.weight_scale.dtype == torch.float16 and torch.equal(layer.weight_scale, before[1])
    assert layer.bias.dtype == torch.bfloat16


def test_no_dequantized_weight_survives_the_call():
    torch.manual_seed(2)
    layer = UPQLinear.from_linear(nn.Linear(64, 32), 2, None, backend="torch")
    refs = []
    original = layer.dequantize

    def spy(dtype=None):
        weight = original(dtype)
        refs.append(weakref.ref(weight))
        return weight

    layer.dequantize = spy
    y = layer(torch.randn(2, 64))
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None
    float_tensors = [t for t in list(layer.buffers()) + list(layer.parameters()) if t.numel() >= 64 * 32]
    assert all(not t.is_floating_point() for t in float_tensors)
    assert y.shape == (2, 32)


def test_repr_is_informative():
    layer = UPQLinear.from_linear(nn.Linear(576, 192, bias=False), 2, 64)
    text = repr(layer)
    for part in ("in_features=576", "out_features=192", "INT2 SEQ", "group_size=64", "bits_per_weight=2.250"):
        assert part in text
    assert "per-row" in repr(UPQLinear.from_linear(nn.Linear(64, 8), 2, None))


def test_constructor_validates():
    with pytest.raises(ValueError, match="bits"):
        UPQLinear(64, 8, bits=8)
    with pytest.raises(ValueError, match="does not divide"):
        UPQLinear(64, 8, bits=2, group_size=48)
