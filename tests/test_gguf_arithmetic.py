"""llama.cpp's arithmetic in upq_hf (``upq_hf.gguf_arithmetic``): the int8 rounding of activations against
hand-computed values, each block type's product against an independent float64 computation from the GGUF
bytes, and the model-level switch (on inside the block, bit-identical outside it)."""

import numpy as np
import pytest
import torch

import upq_hf
from upq_hf import UPQConfig
from upq_hf.convert import upq_layers
from upq_hf.gguf_arithmetic import llama_cpp_arithmetic, q8_0, q8_k, quantized_linear, _blocks_weight
from upq_hf.gguf_export import packed_tensor
from upq_hf.models import load_tokenizer

from helpers import tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_q8_0_rounds_ties_to_even_and_keeps_an_fp16_scale():
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([127.0, 63.5, -0.5, 1.5, 2.5, -2.5])
    q, d16, d = q8_0(x)
    assert q[0, 0, :6].tolist() == [127.0, 64.0, -0.0, 2.0, 2.0, -2.0] and d16.item() == 1.0 == d.item()
    q, d16, d = q8_0(torch.full((1, 32), 0.1))  # d = 0.1 / 127 is not an fp16 number: stored rounded
    assert q.unique().tolist() == [127.0] and d.item() == pytest.approx(0.1 / 127, rel=1e-6)
    assert d16.item() == float(np.float16(np.float32(0.1) / np.float32(127))) != d.item()
    q, d16, _ = q8_0(torch.zeros(1, 32))  # an all-zero block: scale 0, codes 0
    assert d16.item() == 0 and not q.any()


def test_q8_k_scales_by_the_signed_largest_element():
    x = torch.zeros(1, 256)
    x[0, :5] = torch.tensor([-254.0, 3.0, 5.0, -1.0, 254.0])  # the first of largest magnitude (-254) sets the sign
    # iscale = -127 / -254 = 0.5: q = round(0.5 x) ties to even, d = 2
    assert q8_k(x)[0, :5].tolist() == [-254.0, 4.0, 4.0, -0.0, 254.0]
    assert not q8_k(torch.zeros(1, 256)).any()


def _q8_0_numpy(x):
    """An independent Q8_0 in numpy: ``(codes (M, B, 32) int, fp32 d (M, B), fp16 d (M, B) as float64)``."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(-1)
    d = (amax / np.float32(127)).astype(np.float32)
    inverse = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    codes = np.rint(blocks * inverse[..., None]).astype(np.int64)
    return codes, d, d.astype(np.float16).astype(np.float64)


def _blocks(data, width):
    return np.ascontiguousarray(data).reshape(data.shape[0], -1, width)


def _nibbles(qs):
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int64)  # elements j and j + 16 of a block


@pytest.mark.parametrize("bits", [2, 4])
def test_q4_0_and_q4_1_products_match_the_integer_sums_of_the_file(tokenizer, bits):
    """Q4_0: sum_b d_w d_x sum(q_w q_x); Q4_1: plus m_w fp16(d_x sum q_x), from the GGUF bytes in float64."""
    torch.manual_seed(0)
    model = upq_hf.quantize_model(tiny_llama(vocab_size=len(tokenizer)), UPQConfig(bits=bits, group_size=32),
                                  progress=False)
    layer = upq_layers(model)["model.layers.0.mlp.down_proj"]
    data, kind = packed_tensor(layer)
    x = torch.randn(3, layer.in_features) * torch.linspace(0.1, 4, layer.in_features)
    codes, d, d16 = _q8_0_numpy(x.numpy())
    if bits == 2:
        blocks = _blocks(data, 18)
        scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
        qw = _nibbles(blocks[..., 2:]) - 8
        want = np.einsum("nb,mb,nbj,mbj->mn", scale, d16, qw, codes)
    else:
        blocks = _blocks(data, 20)
        scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
        low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        qw = _nibbles(blocks[..., 4:])
        sums = (d * codes.sum(-1)).astype(np.float32).astype(np.float16).astype(np.float64)
        want = np.einsum("nb,mb,nbj,mbj->mn", scale, d16, qw, codes) + np.einsum("nb,mb->mn", low, sums)
    assert kind == ("Q4_0" if bits == 2 else "Q4_1")
    got = quantized_linear(x, *_blocks_weight(layer)[0:3]).double().numpy()
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_q2_k_product_is_q8_k_activations_times_the_decoded_blocks(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512)
    upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=16, scale_grid="q2_k", mix=None), progress=False)
    layer = upq_layers(model)["model.layers.0.mlp.down_proj"]
    kind, weight, mins = _blocks_weight(layer)
    assert kind == "Q2_K" and mins is None
    assert torch.equal(weight, layer.dequantize(torch.float32))  # the grid holds the layer exactly
    x = torch.randn(2, layer.in_features)
    assert torch.equal(quantized_linear(x, kind, weight), q8_k(x) @ weight.t())
    assert not torch.equal(q8_k(x), x)


def test_the_model_computes_as_llama_cpp_inside_the_block_only(tokenizer):
    torch.manual_seed(0)
    model = upq_hf.quantize_model(tiny_llama(vocab_size=len(tokenizer)),
                                  UPQConfig(bits=2, group_size=32, mix="kv4", int4_group_size=32), progress=False)
    model.eval()
    ids = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():
        before = model(ids).logits
        with llama_cpp_arithmetic(model):
            assert model.config._attn_implementation == "upq_llama_cpp"
            emulated = model(ids).logits
            # a causal model: the first 8 positions do not see the last 8
            assert torch.allclose(model(ids[:, :8]).logits, emulated[:, :8], atol=1e-4)
        after = model(ids).logits
    assert torch.equal(before, after) and model.config._attn_implementation != "upq_llama_cpp"
    difference = (emulated - before).abs().max() / before.abs().max()
    assert 0 < difference < 0.05  # int8 activations: close, never equal


def test_refuses_what_llama_cpp_would_not_compute(tokenizer):
    model = upq_hf.quantize_model(tiny_llama(vocab_size=len(tokenizer)), UPQConfig(bits=2, group_size=32),
                                  progress=False)
    with pytest.raises(ValueError, match="dense_type"):
        with llama_cpp_arithmetic(model, dense_type="Q8_0"):
            pass
    with pytest.raises(ValueError, match="float32"):
        with llama_cpp_arithmetic(model.to(torch.bfloat16)):
            pass
