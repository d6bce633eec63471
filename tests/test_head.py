"""The output head under the ``a8`` backend (upq_hf/head.py): int8 weights per row, bf16 activations.

The int8 copy is ``q = rint(w / s)``, ``s = max|row| / 127``: each weight is off by at most ``s / 2``, so against the
dense head an output moves by at most ``sum_k |x_k| s / 2`` plus the rounding of a bf16 product (the kernel sums in
fp32 and rounds the output to bf16 once: relative 2^-8 of the output, and the scale's own bf16 rounding, relative
2^-8). Everything else (other backends, fp32 activations, gradients, a CPU without the a8 kernel) runs the dense
head bit for bit; the state dict, tying and the saved checkpoint are those of the dense head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upq_hf import UPQConfig, avx2, head

from helpers import tiny_llama

needs_a8 = pytest.mark.skipif(not (avx2.available() and avx2.has_a8()),
                              reason="this CPU has no AVX512-VNNI (the a8 kernel's instructions)")


def test_int8_rows_by_hand():
    weight = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.1, -0.3, 0.2]])
    q, scale = head.int8_rows(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    # row 0: s = 2 / 127; 1 * 127 / 2 = 63.5 rounds to even 64, 0.5 * 63.5 = 31.75 -> 32
    assert q[0].tolist() == [64, -127, 32, 0] and scale[0].item() == pytest.approx(2 / 127, rel=1e-7)
    assert q[1].tolist() == [0, 0, 0, 0] and scale[1].item() == 1.0  # an all-zero row: any scale, 1
    assert q[2].tolist() == [127, 42, -127, 85]  # 0.1 * 127 / 0.3 = 42.33, 0.2 * 127 / 0.3 = 84.67
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


def a8_model(backend="a8", tie=True):
    """A tiny Llama in bf16, marked quantized with ``backend`` (its head installed as upq_hf.quantizer does)."""
    from upq_hf.quantizer import attach

    model = tiny_llama(vocab_size=256, tie_word_embeddings=tie).to(torch.bfloat16)
    return attach(model, UPQConfig(bits=2, group_size=32, backend=backend))


@needs_a8
@pytest.mark.parametrize("tie", [True, False])
def test_under_a8_the_head_runs_int8_within_the_derived_bound(tie):
    model = a8_model(tie=tie)
    lm_head = model.get_output_embeddings()
    assert isinstance(lm_head, head.UPQHead) and hasattr(lm_head, "_int8")  # made at install: backend="a8"
    assert (lm_head.weight is model.get_input_embeddings().weight) == tie
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = lm_head(x)
    q, scale = head.int8_rows(lm_head.weight)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 256)
    assert torch.equal(y.reshape(15, 256), torch._weight_int8pack_mm(x.reshape(15, 64), q, scale.bfloat16()))
    xd = x.double().reshape(15, 64)
    int8_exact = xd @ (q.double() * scale.bfloat16().double()[:, None]).t()
    assert ((y.reshape(15, 256).double() - int8_exact).abs()
            <= 2 ** -8 * int8_exact.abs() + 64 * 2 ** -23 * (xd.abs() @ (q.double().abs() * scale.double()[:, None]).t())
            + 1e-6).all()
    dense = xd @ lm_head.weight.double().t()
    step = xd.abs() @ (scale.double()[:, None].expand(-1, 64) / 2).t()  # sum_k |x_k| s / 2
    assert ((y.reshape(15, 256).double() - dense).abs() <= step + 2 ** -7 * dense.abs() + 1e-3).all()
    assert not torch.equal(y, F.linear(x, lm_head.weight))  # it did not run the dense head


@pytest.mark.parametrize("backend", [None, "torch", "avx2"])
def test_other_backends_run_the_dense_head_bit_for_bit(backend, monkeypatch):
    monkeypatch.delenv("UPQ_BACKEND", raising=False)
    model = a8_model(backend)
    lm_head = model.get_output_embeddings()
    x = torch.randn(2, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lm_head(x), F.linear(x, lm_head.weight))
    assert not hasattr(lm_head, "_int8")


@needs_a8
def test_fp32_gradients_and_the_environment(monkeypatch):
    monkeypatch.setenv("UPQ_BACKEND", "a8")
    model = tiny_llama(vocab_size=256)  # fp32
    head.install(model, None)
    lm_head = model.get_output_embeddings()
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(lm_head(x), F.linear(x, lm_head.weight))  # fp32: the dense head
    assert not hasattr(lm_head, "_int8")
    model.bfloat16()
    with torch.no_grad():
        assert not torch.equal(lm_head(x.bfloat16()), F.linear(x.bfloat16(), lm_head.weight))  # UPQ_BACKEND=a8
    assert hasattr(lm_head, "_int8")  # made on the first call that took it
    xg = x.bfloat16().requires_grad_()
    y = lm_head(xg)
    assert torch.equal(y, F.linear(xg, lm_head.weight))  # a gradient: the dense head, and the gradient reaches x
    y.float().sum().backward()
    assert xg.grad is not None


@needs_a8
def test_a_changed_weight_remakes_the_int8_copy():
    model = a8_model()
    lm_head = model.get_output_embeddings()
    x = torch.randn(1, 64).to(torch.bfloat16)
    with torch.no_grad():
        before = lm_head(x)
        lm_head.weight.mul_(2)
        after = lm_head(x)
    q, scale = head.int8_rows(lm_head.weight)
    assert torch.equal(lm_head._int8[0], q)
    assert torch.equal(after, torch._weight_int8pack_mm(x, q, scale.bfloat16())) and not torch.equal(after, before)


def test_without_the_a8_kernel_the_head_stays_dense(monkeypatch):
    """As the layers do (an a8 call runs the exact kernel where the CPU lacks AVX512-VNNI)."""
    monkeypatch.setattr(avx2, "has_a8", lambda: False)
    monkeypatch.setenv("UPQ_BACKEND", "a8")
    model = a8_model(None)
    lm_head = model.get_output_embeddings()
    x = torch.randn(2, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lm_head(x), F.linear(x, lm_head.weight))


@needs_a8
def test_state_dict_saving_and_dequantize_are_the_dense_heads(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16, quantization_config=UPQConfig(
        bits=2, group_size=32, recipe="rtn", backend="a8"))
    assert isinstance(model.get_output_embeddings(), head.UPQHead) and hasattr(model.get_output_embeddings(), "_int8")
    keys = set(model.state_dict())
    assert "lm_head.weight" in keys and not any("int8" in key for key in keys)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    lm_head = reloaded.get_output_embeddings()
    assert isinstance(lm_head, head.UPQHead) and lm_head.backend == "a8"
    assert torch.equal(lm_head.weight, model.get_output_embeddings().weight)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lm_head(x), model.get_output_embeddings()(x))
    reloaded.dequantize()
    assert type(reloaded.get_output_embeddings()) is nn.Linear


@needs_a8
def test_compiled_head_takes_the_int8_path():
    model = a8_model()
    lm_head = model.get_output_embeddings()
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    compiled = torch.compile(lm_head, fullgraph=True)
    with torch.no_grad():
        eager = lm_head(x)
        graph = compiled(x)
    # inductor may sum in another order: the same int8 product to bf16 rounding
    torch.testing.assert_close(graph, eager, rtol=2 ** -7, atol=1e-3)
    dense = F.linear(x, lm_head.weight)
    assert (graph - eager).abs().max() < (dense - eager).abs().max()
