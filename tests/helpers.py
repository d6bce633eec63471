"""Small models and data shared by the tests (imported explicitly: ``from helpers import tiny_llama``)."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=True)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen(seed: int = 0):
    """Qwen2 has biases on q/k/v: exercises the bias path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def random_blocks(n: int = 16, seqlen: int = 24, vocab: int = 128, seed: int = 0):
    """``n`` blocks of ``seqlen`` uniformly random token ids, as a Trainer dataset (``TokenBlockDataset``)."""
    from upq_hf.data import TokenBlockDataset

    generator = torch.Generator().manual_seed(seed)
    return TokenBlockDataset(torch.randint(0, vocab, (n, seqlen), generator=generator))


# ------------------------------------------------------------------------------- the CPU kernels' layers

def upq_layer(bits, group_size, in_features, out_features, bias=True, seed=0, scale_dtype=torch.float16):
    """A ``UPQLinear`` with output rows of different magnitudes and a random bias (the CPU kernel tests' layer)."""
    from torch import nn

    from upq_hf import UPQLinear

    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(out_features, 1) * 4 + 0.1)  # rows of different magnitudes
        if bias:
            linear.bias.normal_()
    return UPQLinear.from_linear(linear, bits, group_size, scale_init="mse", scale_dtype=scale_dtype)


def run_on(module, x, backend):
    """``module(x)`` without gradients on ``backend``."""
    module.backend = backend
    with torch.no_grad():
        return module(x)


def check_cpu_kernel_fallbacks(module, backend: str, max_rows: int, calls: list) -> None:
    """What both CPU kernels promise, on a layer of 128 inputs and 32 outputs with a bias: a call of more than
    ``max_rows`` rows takes the reference path; one of ``max_rows`` takes the kernel; a call that needs a
    gradient for x takes the reference path and gets the exact gradient; a bias alone needing a gradient still
    runs the kernel, and the gradient reaches the bias. ``calls``: where the test's spy records each kernel call."""
    x = torch.randn(max_rows + 1, 128)
    assert torch.equal(run_on(module, x, backend), run_on(module, x, "torch"))
    assert calls == []
    run_on(module, x[:max_rows], backend)
    assert len(calls) == 1
    check_gradients_take_the_reference_path(module, backend, calls)


def check_gradients_take_the_reference_path(module, backend: str, calls: list) -> None:
    """On the same layer: a call that needs a gradient for x takes the reference path (no kernel call) and gets the
    exact gradient; a bias alone needing a gradient still runs the kernel (one call), and the gradient reaches
    the bias."""
    before = len(calls)
    module.backend = backend
    xg = torch.randn(4, 128, requires_grad=True)
    module(xg).square().sum().backward()
    module.backend = "torch"
    xr = xg.detach().clone().requires_grad_(True)
    module(xr).square().sum().backward()
    assert torch.equal(xg.grad, xr.grad) and len(calls) == before
    module.backend = backend
    module.bias.grad = None
    module(torch.randn(4, 128)).sum().backward()
    assert len(calls) == before + 1 and torch.allclose(module.bias.grad, torch.full((32,), 4.0))


def whole_model_on(backend: str, tiny_llama_dir, save_dir):
    """A tiny random Llama quantized on load (INT2 g32, RTN) with ``UPQConfig(backend=backend)``: checks that every
    ``UPQLinear`` has the backend, and that save + plain ``from_pretrained`` keeps it and the logits bit for bit;
    returns its logits on five tokens and the same model's on the reference backend."""
    import copy

    from transformers import AutoModelForCausalLM

    from upq_hf import UPQConfig, UPQLinear

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=UPQConfig(
        bits=2, group_size=32, recipe="rtn", backend=backend)).eval()
    modules = [m for m in model.modules() if isinstance(m, UPQLinear)]
    assert modules and all(m.backend == backend for m in modules)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        logits = model(ids).logits
        reference = copy.deepcopy(model)
        for m in reference.modules():
            if isinstance(m, UPQLinear):
                m.backend = "torch"
        expected = reference(ids).logits
    model.save_pretrained(save_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir).eval()
    assert all(m.backend == backend for m in reloaded.modules() if isinstance(m, UPQLinear))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    return logits, expected
