"""The ``"cpu"`` backend (torch's INT4 CPU kernel, upq_hf/int4pack.py) against the torch reference.

Tolerance, derived (u = 2**-8, bf16's unit roundoff; u_x that of the activation dtype; A = |x| @ |W|.T,
the sum of the magnitudes of the products; Y = |x @ W.T|):

* the CPU path rounds x to bf16 unless it is bf16 already (<= u A), the scale to bf16 (<= u A: for SEQ
  the zero s'/2 is exact), for INT4 the zero s'(8 - z) to bf16 (<= u Z with Z = |x| @ (|8 - z| s').T),
  and the kernel's fp32 result to bf16 (<= u Y); fp16/bf16 results round once more when the bias is
  added (<= u_x Y), fp16 results also in the bf16 -> fp16 cast (<= u_x Y);
* the reference rounds W to the activation dtype (<= u_x A) and its output (<= u_x Y, plus u_x Y for
  the bias);
* fp32 accumulation of K products: <= K 2**-24 A in each.

So |cpu - reference| <= u (A [x not bf16] + A + Z + Y) + u_x (A + 4 Y) + 2 K 2**-24 A, to first order;
second-order terms are covered by the factor (1 + 4 u).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import upq_hf
from upq_hf import UPQConfig, UPQLinear, backends, formats, int4pack
from upq_hf.backends import resolve_backend, torch_linear

from helpers import check_cpu_kernel_fallbacks
from helpers import run_on as run
from helpers import upq_layer as layer

pytestmark = pytest.mark.skipif(not int4pack.available(), reason="this torch build has no INT4 CPU kernel")

U = 2.0 ** -8
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def tolerance(module: UPQLinear, x: torch.Tensor) -> torch.Tensor:
    """The bound of the module docstring, per output element, in x's leading shape."""
    w = module.dequantize(torch.float32)
    xf = x.float().reshape(-1, module.in_features)
    A = xf.abs() @ w.abs().t()
    Y = (xf @ w.t()).abs()
    if module.bits == 4:
        s = module.weight_scale.to(torch.bfloat16).float().t()  # (N, G)
        spread = formats._expand(((8 - module.weight_zero.float().t()).abs() * s), module.group_size,
                                 module.in_features)
        Z = xf.abs() @ spread.t()
    else:
        Z = torch.zeros_like(A)
    ux = UNIT_ROUNDOFF[x.dtype]
    x_rounding = 0.0 if x.dtype == torch.bfloat16 else 1.0
    bound = U * (x_rounding * A + A + Z + Y) + ux * (A + 4 * Y) + 2 * module.in_features * 2.0 ** -24 * A
    if module.bias is not None:
        Y_bias = (xf @ w.t() + module.bias.float()).abs()
        bound = bound + ux * Y_bias  # the bias add rounds a value of this size in both paths
    return (bound * (1 + 4 * U)).reshape(*x.shape[:-1], module.out_features)


# ----------------------------------------------------------------------------------------------
# The kernel's convention, as this module relies on it
# ----------------------------------------------------------------------------------------------

def test_kernel_convention():
    """W[n, k] = (q - 8) * scale[g, n] + zero[g, n], scales_and_zeros (K/g, N, 2), x's dtype; fp32 result
    rounded once. Checked in fp32, where the kernel is exact up to the accumulation order."""
    torch.manual_seed(0)
    N, K, g = 48, 192, 64
    q = torch.randint(0, 16, (N, K), dtype=torch.int32)
    scales_and_zeros = torch.stack([torch.rand(K // g, N) + 0.1, torch.randn(K // g, N)], dim=-1)
    x = torch.randn(5, K)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), g,
                                                   scales_and_zeros)
    scale = scales_and_zeros[..., 0].repeat_interleave(g, 0).t()
    zero = scales_and_zeros[..., 1].repeat_interleave(g, 0).t()
    w = (q.float() - 8) * scale + zero
    bound = K * 2.0 ** -23 * (x.abs() @ w.abs().t())
    assert ((y - x @ w.t()).abs() <= bound).all()
    with pytest.raises(RuntimeError, match="qGroupSize"):
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), 16,
                                                   torch.zeros(K // 16, N, 2))
    with pytest.raises(RuntimeError, match="dividable by 16"):
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[:40], 2)


def test_seq_mapping_rounds_only_the_scale():
    """INT2: codes k + 6 and zero s'/2 give exactly s' (k - 1.5), s' = bf16(s): with bf16 activations the
    result is that weight's product, rounded once to bf16 (<= u |y|, plus fp32 accumulation)."""
    module = layer(2, 64, 576, 192, bias=False)
    x = torch.randn(7, 576).bfloat16()
    y = run(module, x, "cpu").float()
    scale = module.weight_scale.to(torch.bfloat16).float().t()
    w = formats._expand(scale, 64, 576) * (module.codes().float() - 1.5)
    exact = x.float() @ w.t()
    bound = U * exact.abs() + 2 * 576 * 2.0 ** -24 * (x.float().abs() @ w.abs().t())
    assert ((y - exact).abs() <= bound).all()
    # the fp16 scale itself (without the bf16 rounding) is measurably off: the scale is what rounds
    w16 = module.dequantize(torch.float32)
    assert ((y - x.float() @ w16.t()).abs() > bound).any()


# ----------------------------------------------------------------------------------------------
# Against the reference on random layers
# ----------------------------------------------------------------------------------------------

SHAPES = [  # (bits, group_size, in_features, out_features, kernel group size)
    (2, 64, 576, 192, 64),    # the bundled model's k/v projections
    (4, 64, 576, 1536, 64),
    (2, None, 576, 48, 64),   # per-row: the largest kernel group dividing 576, the scale repeated
    (4, None, 96, 40, 32),    # N = 40: padded to 48
    (2, 32, 160, 24, 32),     # N = 24: padded to 32
    (4, 128, 256, 16, 128),
    (2, 256, 512, 32, 256),
    (4, 512, 1024, 32, 256),  # group 512: two kernel groups of 256 per scale
    (2, 96, 192, 40, 32),     # group 96 = 3 x 32
]


@pytest.mark.parametrize("bits,group_size,in_features,out_features,kernel_group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_within_the_derived_bound(bits, group_size, in_features, out_features, kernel_group, dtype):
    module = layer(bits, group_size, in_features, out_features, bias=(in_features + out_features) % 3 != 0,
                   seed=in_features + out_features)
    module = module.to(dtype)  # the bias follows; scales keep their fp16 storage
    assert int4pack.kernel_group_size(in_features, module.group_size) == kernel_group
    for shape in [(in_features,), (3, in_features), (2, 5, in_features)]:
        x = torch.randn(*shape, dtype=dtype) * 2
        y_cpu, y_ref = run(module, x, "cpu"), run(module, x, "torch")
        assert y_cpu.shape == y_ref.shape == (*shape[:-1], out_features) and y_cpu.dtype == dtype
        error = (y_cpu.float() - y_ref.float()).abs()
        bound = tolerance(module, x)
        assert (error <= bound).all(), f"max error/bound {(error / bound).max():.3f}"
    pack = int4pack.cached_pack(module)
    assert pack is not None and pack.group_size == kernel_group
    assert pack.packed.shape[0] == out_features + (-out_features % 16)


@pytest.mark.parametrize("bits", [2, 4])
def test_non_contiguous_inputs_match_the_reference(bits):
    """The hot path views a contiguous input and copies any other: a transposed batch, every other row and
    a slice of a wider last dimension all give the reference's output within the bound."""
    module = layer(bits, 64, 128, 48).to(torch.bfloat16)
    wide = torch.randn(6, 2 * 128, dtype=torch.bfloat16)
    inputs = [torch.randn(128, 4, 3, dtype=torch.bfloat16).permute(2, 1, 0),  # (3, 4, 128), not contiguous
              torch.randn(10, 128, dtype=torch.bfloat16)[::2],                 # every other row
              wide[:, 64:192]]                                                  # columns of a wider tensor
    for x in inputs:
        assert not x.is_contiguous()
        y_cpu, y_ref = run(module, x, "cpu"), run(module, x, "torch")
        assert y_cpu.shape == y_ref.shape == (*x.shape[:-1], 48)
        assert ((y_cpu.float() - y_ref.float()).abs() <= tolerance(module, x)).all()
        assert torch.equal(y_cpu, run(module, x.contiguous(), "cpu"))  # the same numbers as its contiguous copy


def test_bf16_scales_and_fp32_scales():
    for scale_dtype in (torch.bfloat16, torch.float32):
        module = layer(4, 64, 256, 32, scale_dtype=scale_dtype)
        x = torch.randn(4, 256)
        error = (run(module, x, "cpu") - run(module, x, "torch")).abs()
        assert (error <= tolerance(module, x)).all()


# ----------------------------------------------------------------------------------------------
# What falls back to the reference, and when
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,in_features", [(2, None, 100), (4, 16, 96), (2, 8, 64), (4, 48, 96)])
def test_unsupported_layers_fall_back_to_the_reference(bits, group_size, in_features):
    module = layer(bits, group_size, in_features, 24)
    assert int4pack.unsupported_reason(module) is not None
    x = torch.randn(3, in_features)
    assert torch.equal(run(module, x, "cpu"), run(module, x, "torch"))
    assert int4pack.cached_pack(module) is None


def test_many_rows_and_gradients_take_the_reference_path(monkeypatch):
    module = layer(2, 64, 128, 32)
    calls = []
    monkeypatch.setattr(int4pack, "_mm", lambda *args: calls.append(args[0].shape) or
                        torch.ops.aten._weight_int4pack_mm_for_cpu(*args))
    check_cpu_kernel_fallbacks(module, "cpu", int4pack.MAX_ROWS, calls)
    assert calls[0] == (int4pack.MAX_ROWS, 128)


def test_cpu_backend_on_another_device_is_an_error():
    module = layer(2, 64, 128, 32)
    module.backend = "cpu"
    with pytest.raises(RuntimeError, match="CPU tensors"):
        module(torch.randn(2, 128, device="meta"))


# ----------------------------------------------------------------------------------------------
# Choosing the backend
# ----------------------------------------------------------------------------------------------

def test_backend_choice_and_forcing(monkeypatch):
    from upq_hf import backends

    monkeypatch.delenv("UPQ_BACKEND", raising=False)
    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: True)  # the machine where calls of rows go here
    x = torch.randn(2, 128)
    assert resolve_backend(x, None) == "cpu"  # CPU tensors of more than AVX2_FIRST_ROWS rows, kernel available
    assert resolve_backend(x, "torch") == "torch"
    module = layer(4, 32, 128, 32)
    calls = []
    monkeypatch.setattr(int4pack, "_mm", lambda *args: calls.append(1) or torch.ops.aten._weight_int4pack_mm_for_cpu(*args))
    with torch.no_grad():
        y_auto = module(x)
        assert len(calls) == 1
        monkeypatch.setenv("UPQ_BACKEND", "torch")
        assert torch.equal(module(x), torch_linear(x, module)) and len(calls) == 1
        monkeypatch.setenv("UPQ_BACKEND", "cpu")
        assert torch.equal(module(x), y_auto) and len(calls) == 2
        module.backend = "torch"  # the module's choice (UPQConfig(backend=)) wins over the variable
        assert torch.equal(module(x), torch_linear(x, module)) and len(calls) == 2
    monkeypatch.setenv("UPQ_BACKEND", "int4")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(x, None)
    assert UPQConfig(backend="cpu").backend == "cpu"
    with pytest.raises(ValueError, match="backend"):
        UPQConfig(backend="int4")


def test_config_backend_reaches_the_layers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=UPQConfig(
        bits=2, group_size=32, recipe="rtn", backend="cpu"))
    modules = [m for m in model.modules() if isinstance(m, UPQLinear)]
    assert modules and all(m.backend == "cpu" for m in modules)


# ----------------------------------------------------------------------------------------------
# The cache: made once, rebuilt when the buffers change, never saved
# ----------------------------------------------------------------------------------------------

def test_repacked_once_and_rebuilt_when_the_buffers_change(monkeypatch):
    module = layer(4, 64, 256, 32)
    module.backend = "cpu"
    made = []
    real = int4pack.repack
    monkeypatch.setattr(int4pack, "repack", lambda m: made.append(1) or real(m))
    x = torch.randn(3, 256)
    with torch.no_grad():
        first = module(x)
        for _ in range(3):
            assert torch.equal(module(x), first)
        assert len(made) == 1
        # in place (load_state_dict copies into the buffers): version counters change
        other = layer(4, 64, 256, 32, seed=5)
        module.load_state_dict(other.state_dict())
        second = module(x)
        assert len(made) == 2 and not torch.equal(second, first)
        assert (second - run(other, x, "torch")).abs().le(tolerance(other, x)).all()
        module.backend = "cpu"
        # replaced buffers (from_pretrained's assignment, module.weight = ...)
        module.weight = layer(4, 64, 256, 32, seed=6).weight
        module(x)
        assert len(made) == 3
        module.weight_scale.mul_(2)
        module(x)
        assert len(made) == 4
        module.weight_zero.add_(1)  # INT4's zero points are checked too
        module(x)
        assert len(made) == 5
        # .to() (device or dtype moves) drops the copy
        module.to(torch.bfloat16)
        assert int4pack.CACHE_ATTRIBUTE not in module.__dict__
        module(x.bfloat16())
        assert len(made) == 6


@pytest.mark.parametrize("bits", [2, 4])
def test_inference_mode_layers_and_calls(bits):
    """``chat.generate_answers`` decodes under ``torch.inference_mode()``. A layer built outside it and called
    inside, and a layer whose buffers are made inside it (inference tensors, which have no version counter)
    both run on the kernel, within the reference bound, repacked once."""
    x = torch.randn(2, 256)
    outside = layer(bits, 64, 256, 48)
    outside.backend = "cpu"
    with torch.inference_mode():
        y = outside(x)
        assert torch.equal(outside(x), y)
    assert (y - run(outside, x, "torch")).abs().le(tolerance(outside, x)).all()
    with torch.inference_mode():
        inside = layer(bits, 64, 256, 48)
        inside.backend = "cpu"
        assert inside.weight.is_inference()
        y_inside = inside(x)
        pack = int4pack.cached_pack(inside)
        assert int4pack.cached_pack(inside) is pack  # reused, not rebuilt every call
        assert torch.equal(inside(x), y_inside)
        # replaced buffers are still seen by identity
        inside.weight = layer(bits, 64, 256, 48, seed=7).weight
        assert int4pack.cached_pack(inside) is not pack
    assert torch.equal(y_inside, y)  # same seed: the same layer
    # no version counter inside inference_mode: an in-place change needs drop_cache, as documented
    with torch.inference_mode():
        inside.weight_scale.mul_(2)
        int4pack.drop_cache(inside)
        doubled = inside(x)
    assert (doubled - run(inside, x, "torch")).abs().le(tolerance(inside, x)).all()


def test_cache_is_not_state_and_holds_no_float_weight():
    module = layer(2, 64, 512, 64)
    keys_and_bytes = {k: v.clone() for k, v in module.state_dict().items()}
    buffers = [name for name, _ in module.named_buffers()]
    run(module, torch.randn(2, 512), "cpu")
    state = module.state_dict()
    assert list(state) == list(keys_and_bytes) and all(torch.equal(state[k], v) for k, v in keys_and_bytes.items())
    assert [name for name, _ in module.named_buffers()] == buffers
    pack = int4pack.cached_pack(module)
    assert pack.packed.dtype == torch.uint8 and pack.packed.numel() == 512 * 64 // 2
    assert pack.scales_and_zeros.numel() == (512 // 64) * 64 * 2  # 4 bytes per group and output
    clone = copy.deepcopy(module)
    assert int4pack.CACHE_ATTRIBUTE not in clone.__dict__
    assert torch.equal(run(clone, torch.ones(1, 512), "cpu"), run(module, torch.ones(1, 512), "cpu"))


def test_mixed_bits_model_each_layer_on_its_own_format(tmp_path, monkeypatch):
    """Mixed bits (UPQConfig.module_bits): each layer is repacked with its own bits and group size, a layer
    the kernel cannot take (group 16) runs on the reference path beside the others; every layer is within the
    derived bound on its real inputs, the whole model closer to the fp32 reference than a bf16 run of it,
    and a save/reload gives the same formats and the same output."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: True)  # where calls of several rows go to the kernel

    from helpers import tiny_llama
    from upq_hf.convert import upq_layers

    monkeypatch.delenv("UPQ_BACKEND", raising=False)
    model = tiny_llama()
    formats_by_pattern = {r"\.(k|v)_proj$": 4,  # int4_group_size 32
                          r"layers\.0\.mlp\.down_proj$": {"bits": 2, "group_size": 16},  # no kernel group fits
                          r"layers\.1\.mlp\.up_proj$": {"bits": 4, "group_size": None},  # per row
                          r"layers\.1\.self_attn\.o_proj$": {"bits": 2, "group_size": None}}
    upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=32, int4_group_size=32,
                                           module_bits=formats_by_pattern), progress=False)
    layers = upq_layers(model)
    expected = {"model.layers.0.self_attn.k_proj": (4, 32, 32), "model.layers.1.self_attn.v_proj": (4, 32, 32),
                "model.layers.0.mlp.down_proj": (2, 16, None), "model.layers.1.mlp.up_proj": (4, None, 64),
                "model.layers.1.self_attn.o_proj": (2, None, 64), "model.layers.0.self_attn.q_proj": (2, 32, 32)}
    for name, (bits, group, kernel_group) in expected.items():
        module = layers[name]
        assert (module.bits, module.group_size) == (bits, group)
        assert int4pack.kernel_group_size(module.in_features, module.group_size) == kernel_group
    # every layer's call on real activations (recorded on the reference path), cpu against the bound
    inputs = {}

    def record(name):
        def hook(module, args):
            inputs[name] = args[0].detach()
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in layers.items()]
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2]])
    monkeypatch.setenv("UPQ_BACKEND", "torch")
    with torch.no_grad():
        reference = model(ids).logits
    for hook in hooks:
        hook.remove()
    monkeypatch.delenv("UPQ_BACKEND")
    calls = []
    monkeypatch.setattr(int4pack, "_mm", lambda *args: calls.append(args[0].shape) or
                        torch.ops.aten._weight_int4pack_mm_for_cpu(*args))
    for name, module in layers.items():
        x = inputs[name]
        y = run(module, x, None)  # auto: the cpu backend where the layer fits
        assert (y - run(module, x, "torch")).abs().le(tolerance(module, x)).all(), name
        module.backend = None
    assert len(calls) == len(layers) - 1  # all but the group-16 layer ran on the kernel
    assert int4pack.cached_pack(layers["model.layers.0.mlp.down_proj"]) is None
    with torch.no_grad():
        logits = model(ids).logits  # the whole mixed model on the auto choice
    # the whole model: closer to the fp32 reference than the same model run in bf16 on the reference path
    # (the kernel rounds only the layers' inputs and scales, fp32 inside)
    monkeypatch.setenv("UPQ_BACKEND", "torch")
    with torch.no_grad():
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(ids).logits.float()
    monkeypatch.delenv("UPQ_BACKEND")
    assert (logits - reference).abs().max() < (bf16 - reference).abs().max()
    # save and reload: the mixed model comes back with the same formats and the same cpu-backend output
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {n: (m.bits, m.group_size) for n, m in upq_layers(reloaded).items()} == \
        {n: (m.bits, m.group_size) for n, m in layers.items()}
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def safetensors_content(folder):
    """A safetensors file's header (tensor names, dtypes, shapes, offsets; the metadata) as parsed JSON and its
    data bytes. Not the raw file: safetensors writes the metadata map in hash order, which differs between two
    saves of the same model (seen with the three keys upq_format_version, upq_in_features, format)."""
    import json
    import struct

    raw = (folder / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def test_save_pretrained_is_unchanged_by_the_cache(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: True)  # where calls of several rows go to the kernel

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    upq_hf.quantize_model(model, UPQConfig(bits=4, group_size=32, recipe="rtn"), progress=False)
    model.save_pretrained(tmp_path / "before")
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2]])
    os.environ.pop("UPQ_BACKEND", None)
    with torch.no_grad():
        logits = model(ids).logits  # auto: the CPU kernel, every layer repacked
    assert all(int4pack.CACHE_ATTRIBUTE in m.__dict__ for m in model.modules() if isinstance(m, UPQLinear))
    model.save_pretrained(tmp_path / "after")
    assert safetensors_content(tmp_path / "before") == safetensors_content(tmp_path / "after")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "after").eval()
    assert all(int4pack.CACHE_ATTRIBUTE not in m.__dict__ for m in reloaded.modules() if isinstance(m, UPQLinear))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


# ----------------------------------------------------------------------------------------------
# The bundled model: fidelity unchanged within noise
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled_int2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upq_hf.convert import quantize_linears_rtn
    from upq_hf.models import bundled_model_dir

    folder = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    quantize_linears_rtn(student, 2, 64, scale_init="max")  # `upq quantize --bits 2 --recipe rtn`, faster init
    prompts = ["What is the capital of France?", "Write a haiku about autumn leaves."]
    ids = []
    for prompt in prompts:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt")
        ids.append(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return teacher, student, ids


def log_probs(model, ids, backend, monkeypatch):
    monkeypatch.setenv("UPQ_BACKEND", backend)
    with torch.no_grad():
        return torch.cat([torch.log_softmax(model(i).logits.float()[0], -1) for i in ids])


def kl(p, q):
    return (p.exp() * (p - q)).sum(-1)


def test_bundled_int2_model_fidelity_unchanged_within_noise(bundled_int2, monkeypatch):
    """Two yardsticks. Rounding noise: the same model run in bf16 on the reference path; the CPU kernel
    rounds less (only the linears' inputs and scales; fp32 inside), so it must stay closer to the fp32
    reference than that. Measurement noise: the fidelity metric's own standard error over these tokens;
    the backend must move the model's KL to the teacher by a small fraction of it."""
    teacher, student, ids = bundled_int2
    reference = log_probs(student, ids, "torch", monkeypatch)
    cpu = log_probs(student, ids, "cpu", monkeypatch)
    bf16 = log_probs(copy.deepcopy(student).to(torch.bfloat16), ids, "torch", monkeypatch)
    assert kl(reference, cpu).mean() < 0.5 * kl(reference, bf16).mean()  # measured: 0.011 against 0.084 nats
    target = log_probs(teacher, ids, "torch", monkeypatch)
    kl_reference, kl_cpu = kl(target, reference), kl(target, cpu)
    standard_error = kl_reference.std() / len(kl_reference) ** 0.5
    # measured: 12.94 against 12.90 nats, standard error 0.59
    assert abs(kl_cpu.mean() - kl_reference.mean()) < 0.25 * standard_error
    # (top-1 agreement with the teacher is 0 for this round-to-nearest INT2 model on both paths: no signal)
