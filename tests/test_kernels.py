"""The Triton kernels (``upq_kernels``) against the exact dequantized weight.

Without a GPU they run under Triton's interpreter (conftest.py sets ``TRITON_INTERPRET=1``).
The reference is always fp32 ``x @ W.T + b`` with ``W`` rebuilt from the packed tensor by
``upq_hf.packing.unpack_codes`` and ``upq_hf.formats.dequantize_seq``/``dequantize_int4``, never by
the kernels. Every kernel writes into a NaN-poisoned strided view of a larger buffer: an element
left unwritten stays NaN and a write outside the view shows up in the border.

Tolerances (relative to the largest reference value, plus a relative term per element): the
kernels accumulate in fp32, so the error is the rounding of the result to the output dtype:
fp32 1e-5, fp16 2e-3 (eps 4.9e-4), bf16 1.6e-2 (eps 3.9e-3; the interpreter truncates fp32 to bf16
instead of rounding, so one ulp more).
"""

from __future__ import annotations

import json

import pytest
import torch

import upq_kernels
from upq_hf import UPQLinear, formats, packing
from upq_kernels import common, dispatch, tuning

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# name -> (bits, group_size, in_features K, out_features N): odd K and N throughout
LAYERS = {
    "int2-row": (2, None, 90, 72),  # K not a multiple of 16: the last word is padded
    "int2-g16": (2, 16, 80, 72),  # five K blocks of 16: split-K leaves an empty split
    "int2-g64": (2, 64, 192, 48),  # three groups, like K = 576 with group 64
    "int2-g192": (2, 192, 576, 40),  # a group that is no power of two: the bulk of the kv4 mix on the bundled model
    "int4-row": (4, None, 100, 40),  # K not a multiple of 8
    "int4-g32": (4, 32, 96, 100),
}
ROWS = {"gemv": 3, "splitk": 7, "tiled": 33, "dequant": 5}


def make_layer(bits: int, group_size: int | None, in_features: int, out_features: int, seed: int = 0,
               scale_dtype: torch.dtype = torch.float16):
    """Fresh random codes covering every value, packed; scales and zeros in the stored layout;
    and the fp32 reference weight rebuilt from the packed tensor."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out_features, in_features), generator=generator, dtype=torch.uint8)
    assert codes.unique().numel() == 2 ** bits
    groups = formats.num_groups(in_features, group_size)
    scale = (0.5 + torch.rand(out_features, groups, generator=generator)).to(scale_dtype)
    zero = None
    if bits == 4:  # fractional zero points as well as integer ones
        zero = (torch.randint(0, 31, (out_features, groups), generator=generator) / 2).to(scale_dtype)
    packed = packing.pack_codes(codes, bits)

    unpacked = packing.unpack_codes(packed, bits, in_features)
    if bits == 2:
        reference_weight = formats.dequantize_seq(unpacked, scale, group_size)
    else:
        reference_weight = formats.dequantize_int4(unpacked, scale, zero, group_size)
    stored_zero = None if zero is None else zero.t().contiguous()
    return (packed, scale.t().contiguous(), stored_zero, bits, group_size, in_features), reference_weight


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ weight.t()
    return y if bias is None else y + bias.float()


def poisoned_out(rows: int, cols: int, dtype: torch.dtype):
    """A NaN buffer and a strided ``(rows, cols)`` view inside it with a border on every side."""
    buffer = torch.full((rows + 2, cols + 3), float("nan"), dtype=dtype)
    return buffer, buffer[1:rows + 1, 1:cols + 1]


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements were never written"
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def run_poisoned(x, layer_args, bias, **kwargs) -> torch.Tensor:
    """``upq_matmul`` into a poisoned view; checks the border was not written and returns the view."""
    buffer, out = poisoned_out(x.shape[0], layer_args[0].shape[1], x.dtype)
    result = upq_kernels.upq_matmul(x, *layer_args, bias=bias, out=out, **kwargs)
    assert result.data_ptr() == out.data_ptr()
    border = torch.ones_like(buffer, dtype=torch.bool)
    border[1:x.shape[0] + 1, 1:out.shape[1] + 1] = False
    assert buffer[border].isnan().all(), "a kernel wrote outside its output"
    return out


def activations(rows: int, in_features: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    # a non-zero mean makes x.codes and z * sum(x) large and cancelling, as in real activations
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, in_features, generator=generator) + 0.5).to(dtype)


# ----------------------------------------------------------------------------------------------
# Each variant, forced, on every layer kind, in fp16 and bf16
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("variant", ["gemv", "splitk", "tiled", "dequant"])
def test_variant_matches_reference(variant, layer, dtype):
    layer_args, weight = make_layer(*LAYERS[layer])
    x = activations(ROWS[variant], layer_args[5], dtype)
    bias = torch.randn(weight.shape[0]).to(dtype)
    out = run_poisoned(x, layer_args, bias, variant=variant)
    assert_matches(out, reference(x, weight, bias), dtype)


@pytest.mark.parametrize("variant", ["gemv", "splitk", "tiled", "dequant"])
def test_variant_fp32_activations_without_bias(variant):
    layer_args, weight = make_layer(*LAYERS["int4-g32"], scale_dtype=torch.bfloat16)
    x = activations(ROWS[variant], layer_args[5], torch.float32)
    out = run_poisoned(x, layer_args, None, variant=variant)
    assert_matches(out, reference(x, weight, None), torch.float32)


# ----------------------------------------------------------------------------------------------
# Each configuration of each variant alone (autotuning could hide a broken one)
# ----------------------------------------------------------------------------------------------

CONFIG_CASES = [(name, index) for name in dispatch.FUSED_VARIANTS + ("dequant",)
                for index in range(len(dispatch.VARIANTS[name].CONFIGS))]


@pytest.mark.parametrize("variant, index", CONFIG_CASES, ids=[f"{v}-{i}" for v, i in CONFIG_CASES])
def test_each_config_alone(variant, index):
    config = dispatch.VARIANTS[variant].CONFIGS[index]
    # alternate layer kinds so every config meets INT2 and INT4, per-row and per-group
    layer = ("int2-row", "int4-g32", "int2-g64", "int4-row")[index % 4]
    layer_args, weight = make_layer(*LAYERS[layer], seed=index)
    x = activations(ROWS[variant], layer_args[5], torch.float16, seed=index)
    bias = torch.randn(weight.shape[0]).half()
    out = run_poisoned(x, layer_args, bias, variant=variant, config=config)
    assert_matches(out, reference(x, weight, bias), torch.float16)


BORDER_CASES = {
    # every split of K = 80 in blocks of 16 gets at most 2 blocks: splits 3.. get none and write zeros
    "splitk-empty-splits": ("splitk", "int2-g16", 20, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=4)),
    "gemv-empty-splits": ("gemv", "int2-g16", 2, dict(BLOCK_N=32, BLOCK_K=16, SPLIT_K=4)),
    # blocks larger than the whole problem in every dimension
    "tiled-oversized": ("tiled", "int4-row", 5, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, GROUP_M=8)),
    # many row tiles in several GROUP_M groups, the last group short
    "tiled-row-groups": ("tiled", "int2-row", 83, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2)),
    # more rows than one gemv program takes
    "gemv-row-blocks": ("gemv", "int4-g32", 9, dict(BLOCK_N=64, BLOCK_K=32, SPLIT_K=2)),
}


@pytest.mark.parametrize("case", BORDER_CASES)
def test_border_case_configs(case):
    variant, layer, rows, config = BORDER_CASES[case]
    layer_args, weight = make_layer(*LAYERS[layer])
    x = activations(rows, layer_args[5], torch.float16)
    bias = torch.randn(weight.shape[0]).half()
    out = run_poisoned(x, layer_args, bias, variant=variant, config=config)
    assert_matches(out, reference(x, weight, bias), torch.float16)


def test_config_fitting_keeps_blocks_legal():
    layer_args, _ = make_layer(*LAYERS["int2-g16"])
    weight = common.PackedWeight(*layer_args)
    fitted = dispatch.VARIANTS["splitk"].fit_config(dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, SPLIT_K=16), 5, weight)
    assert fitted == dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=16, SPLIT_K=5)
    # INT2 codes come 16 to a word: no BLOCK_K divides a group of 8
    int2_g8 = common.PackedWeight(*make_layer(2, 8, 64, 32)[0])
    assert dispatch.VARIANTS["gemv"].fit_config(dispatch.VARIANTS["gemv"].DEFAULT_CONFIG, 1, int2_g8) is None


def test_forcing_a_variant_that_cannot_run_raises():
    layer_args, _ = make_layer(2, 8, 64, 32)
    x = activations(1, 64, torch.float16)
    with pytest.raises(ValueError, match="no BLOCK_K"):
        upq_kernels.upq_matmul(x, *layer_args, variant="gemv")


def test_inconsistent_inputs_raise():
    (packed, scale, zero, bits, group_size, in_features), _ = make_layer(*LAYERS["int4-g32"])
    x = activations(2, in_features, torch.float16)
    with pytest.raises(ValueError, match="scale must have shape"):
        upq_kernels.upq_matmul(x, packed, scale[:1], zero, bits, group_size, in_features)
    with pytest.raises(ValueError, match="INT4 needs a zero-point"):
        upq_kernels.upq_matmul(x, packed, scale, None, bits, group_size, in_features)
    with pytest.raises(ValueError, match="x must have shape"):
        upq_kernels.upq_matmul(x[:, :64], packed, scale, zero, bits, group_size, in_features)
    with pytest.raises(ValueError, match="out must be"):
        upq_kernels.upq_matmul(x, packed, scale, zero, bits, group_size, in_features, out=torch.empty(2, 100))


def test_group_size_equal_to_in_features_means_per_row():
    layer_args, weight = make_layer(*LAYERS["int2-row"])
    x = activations(2, 90, torch.float16)
    per_row = layer_args[:4] + (None, 90)
    as_one_group = layer_args[:4] + (90, 90)
    expected = reference(x, weight, None)
    assert_matches(upq_kernels.upq_matmul(x, *per_row), expected, torch.float16)
    assert_matches(upq_kernels.upq_matmul(x, *as_one_group), expected, torch.float16)


def test_zero_rows():
    layer_args, _ = make_layer(*LAYERS["int2-row"])
    out = upq_kernels.upq_matmul(torch.empty(0, 90, dtype=torch.float16), *layer_args)
    assert out.shape == (0, 72) and out.dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# Dequantization and the exponent trick
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["int2-row", "int2-g16", "int4-g32", "int4-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_packed_equals_formats_dequantize(layer, dtype):
    layer_args, weight = make_layer(*LAYERS[layer])
    dense = upq_kernels.dequantize_packed(*layer_args, dtype=dtype)
    assert dense.shape == weight.shape and dense.dtype == dtype
    if dtype == torch.bfloat16 and common.INTERPRETER:
        # the interpreter truncates fp32 -> bf16 where torch rounds: at most one ulp apart
        torch.testing.assert_close(dense.float(), weight, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(dense, weight.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_magic_constants_turn_codes_into_floats(dtype):
    pattern, value = common.MAGIC[dtype]
    codes = torch.arange(16, dtype=torch.int32)
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int16
    as_float = (codes | pattern).to(int_dtype).view(dtype)
    assert torch.equal(as_float - value, codes.to(dtype))


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

def test_variant_chosen_by_rows():
    int2_row = common.PackedWeight(*make_layer(*LAYERS["int2-row"])[0])
    chosen = {M: dispatch.choose_variant(M, int2_row) for M in (1, 4, 5, 64, 65, 1023, 1024, 4096)}
    assert chosen == {1: "gemv", 4: "gemv", 5: "splitk", 64: "splitk", 65: "tiled", 1023: "tiled",
                      1024: "dequant", 4096: "dequant"}
    # INT4 with groups of 8: gemv fits (8 codes a word); tl.dot needs BLOCK_K >= 16
    int4_g8 = common.PackedWeight(*make_layer(4, 8, 64, 32)[0])
    assert [dispatch.choose_variant(M, int4_g8) for M in (1, 16, 200)] == ["gemv", "dequant", "dequant"]
    int2_g8 = common.PackedWeight(*make_layer(2, 8, 64, 32)[0])
    assert dispatch.choose_variant(1, int2_g8) == "dequant"


def test_dispatch_thresholds_are_adjustable(monkeypatch):
    weight = common.PackedWeight(*make_layer(*LAYERS["int2-row"])[0])
    monkeypatch.setattr(upq_kernels.RULES, "dequant_min_m", 128)
    monkeypatch.setattr(upq_kernels.RULES, "gemv_max_m", 1)
    assert [dispatch.choose_variant(M, weight) for M in (1, 2, 127, 128)] == ["gemv", "splitk", "tiled", "dequant"]


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls that reach ``upq_kernels.upq_linear`` (what backends.py calls)."""
    calls = []
    original = upq_kernels.upq_linear

    def counting(x, module):
        calls.append(x.shape)
        return original(x, module)

    monkeypatch.setattr(upq_kernels, "upq_linear", counting)
    return calls


def quantized_linear(bits: int, group_size: int | None, in_features: int, out_features: int, dtype: torch.dtype,
                     backend: str | None) -> UPQLinear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features).to(dtype)
    return UPQLinear.from_linear(linear, bits=bits, group_size=group_size, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, group_size, rows", [(2, None, 1), (2, 32, 6), (4, 32, 70)])
def test_module_triton_backend_matches_torch_backend(bits, group_size, rows, dtype, triton_calls):
    module = quantized_linear(bits, group_size, 96, 40, dtype, backend="triton")
    x = torch.randn(1, rows, 96).to(dtype)
    with torch.no_grad():
        y_triton = module(x)
        module.backend = "torch"
        y_torch = module(x)
    assert len(triton_calls) == 1
    assert y_triton.shape == (1, rows, 40) and y_triton.dtype == dtype
    expected = reference(x.reshape(-1, 96), module.dequantize(torch.float32), module.bias).reshape(1, rows, 40)
    assert_matches(y_triton, expected, dtype)
    assert_matches(y_torch, expected, dtype)  # the two backends agree through the same reference


def test_env_selects_triton_backend(monkeypatch, triton_calls):
    module = quantized_linear(2, None, 96, 40, torch.float16, backend=None)
    x = torch.randn(2, 96).half()
    monkeypatch.setenv("UPQ_BACKEND", "triton")
    with torch.no_grad():
        y_triton = module(x)
    assert len(triton_calls) == 1
    monkeypatch.setenv("UPQ_BACKEND", "torch")
    with torch.no_grad():
        y_torch = module(x)
    assert len(triton_calls) == 1
    assert_matches(y_triton, y_torch.float(), torch.float16)


def test_gradients_match_torch_backend():
    module = quantized_linear(4, 32, 96, 40, torch.float32, backend="triton")
    x = torch.randn(3, 96, requires_grad=True)
    (module(x) ** 2).sum().backward()
    grad_x, grad_bias = x.grad.clone(), module.bias.grad.clone()
    x.grad = None
    module.bias.grad = None
    module.backend = "torch"
    (module(x) ** 2).sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_bias, module.bias.grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The custom ops
# ----------------------------------------------------------------------------------------------

def test_linear_op_passes_opcheck():
    layer_args, _ = make_layer(*LAYERS["int2-row"])
    x = activations(1, 90, torch.float16)
    bias = torch.randn(72).half()
    packed, scale, zero, bits, group_size, in_features = layer_args
    torch.library.opcheck(torch.ops.upq.linear.default, (x, packed, scale, zero, bias, bits, group_size, in_features))
    layer_args, _ = make_layer(*LAYERS["int4-row"])
    x = activations(2, 100, torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.upq.linear.default, (x, *layer_args[:3], None, *layer_args[3:]))


def test_dequantize_op_passes_opcheck():
    layer_args, _ = make_layer(*LAYERS["int4-g32"])
    torch.library.opcheck(torch.ops.upq.dequantize_transposed.default, (*layer_args, torch.bfloat16))


def test_fake_implementations_give_shape_and_dtype_on_meta():
    layer_args, _ = make_layer(*LAYERS["int4-g32"])
    packed, scale, zero, bits, group_size, in_features = (a.to("meta") if torch.is_tensor(a) else a
                                                          for a in layer_args)
    x = torch.empty(2, 7, in_features, dtype=torch.bfloat16, device="meta")
    y = torch.ops.upq.linear(x, packed, scale, zero, None, bits, group_size, in_features)
    assert y.shape == (2, 7, 100) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    w_t = torch.ops.upq.dequantize_transposed(packed, scale, zero, bits, group_size, in_features, torch.float16)
    assert w_t.shape == (in_features, 100) and w_t.dtype == torch.float16


def test_torch_compile_traces_the_op_in_one_graph():
    module = quantized_linear(2, 32, 96, 40, torch.float16, backend="triton")
    x = torch.randn(2, 3, 96).half()
    with torch.no_grad():
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), upq_kernels.upq_linear(x, module), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Tuned configurations as data
# ----------------------------------------------------------------------------------------------

def test_config_store_round_trips_through_json(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    key = tuning.tuning_key("splitk", 2, None, 4096, 4096, 13, torch.float16)
    assert key == tuning.tuning_key("splitk", 2, None, 4096, 4096, 16, torch.float16)
    assert key != tuning.tuning_key("splitk", 2, None, 4096, 4096, 17, torch.float16)
    config = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3)
    tuning.ConfigStore().put("NVIDIA H100 80GB HBM3", key, config)
    path = tuning.cache_path("NVIDIA H100 80GB HBM3")
    assert path.parent == tmp_path and " " not in path.name
    assert json.loads(path.read_text())["configs"][key] == config
    assert tuning.ConfigStore().get("NVIDIA H100 80GB HBM3", key) == config


def test_without_gpu_the_default_config_runs():
    weight = common.PackedWeight(*make_layer(*LAYERS["int2-row"])[0])
    module = dispatch.VARIANTS["gemv"]

    def must_not_run(config):
        raise AssertionError("nothing is benchmarked without a GPU")

    chosen = tuning.select_config("key", torch.device("cpu"), module.CONFIGS, module.DEFAULT_CONFIG,
                                  lambda c: module.fit_config(c, 1, weight), must_not_run)
    assert chosen == module.fit_config(module.DEFAULT_CONFIG, 1, weight)
