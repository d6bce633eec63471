"""GGUF export: every quantized layer read back with the gguf package and dequantized equals upq_hf's weights
(SEQ INT2 as Q4_0 bit for bit; INT4 as Q4_1 to the fp16 rounding of its minimum), the metadata and tokenizer as
llama.cpp's converter writes them, and the clear errors."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

import upq_hf
from upq_hf import UPQConfig
from upq_hf.convert import upq_layers
from upq_hf.gguf_export import _permute_rows, export_gguf
from upq_hf.models import load_tokenizer

from helpers import tiny_llama

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def quantized(tokenizer, **config):
    model = tiny_llama(vocab_size=len(tokenizer))
    return upq_hf.quantize_model(model, UPQConfig(**config), progress=False)


def read_back(path):
    """``{gguf name: (dequantized array, type name)}``."""
    return {t.name: (dequantize(t.data, t.tensor_type), t.tensor_type.name) for t in GGUFReader(path).tensors}


def expected(name, layer):
    """upq_hf's dequantized weight of a layer, rows in llama.cpp's rotary order for q/k (4 heads, 2 kv heads)."""
    weight = layer.dequantize(torch.float32)
    kind = name.rpartition(".")[2]
    if kind in ("q_proj", "k_proj"):
        weight = weight[_permute_rows(torch.arange(weight.shape[0]), 4 if kind == "q_proj" else 2)]
    return weight.numpy()


def gguf_name(name):
    return f"blk.{name.split('.')[2]}.{GGUF_NAMES[name.rpartition('.')[2]]}.weight"


@pytest.mark.parametrize("group_size", [32, 64, None])
def test_int2_is_q4_0_bit_for_bit(tokenizer, tmp_path, group_size):
    model = quantized(tokenizer, bits=2, group_size=group_size)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer)
    tensors = read_back(tmp_path / "m.gguf")
    for name, layer in upq_layers(model).items():
        data, kind = tensors[gguf_name(name)]
        assert kind == "Q4_0" and np.array_equal(data, expected(name, layer)), name
    assert report.fallbacks == {} and report.types["token_embd.weight"] == "F32"


def test_int4_is_q4_1_to_the_rounding_of_its_minimum(tokenizer, tmp_path):
    model = quantized(tokenizer, bits=4, group_size=32)
    export_gguf(model, tmp_path / "m.gguf", tokenizer)
    tensors = read_back(tmp_path / "m.gguf")
    for name, layer in upq_layers(model).items():
        data, kind = tensors[gguf_name(name)]
        want = expected(name, layer)
        # m = -s z rounded to fp16: at most half an fp16 step of |m| (2^-11 relative) away, per block
        qw = layer.quantized_weight()
        m = (qw.scale.float() * qw.zero.float()).abs().repeat_interleave(32, dim=1)
        if name.rpartition(".")[2] in ("q_proj", "k_proj"):
            m = m[_permute_rows(torch.arange(m.shape[0]), 4 if name.endswith("q_proj") else 2)]
        assert kind == "Q4_1" and np.all(np.abs(data - want) <= m.numpy() * 2.0 ** -11 + 1e-12), name


def test_a_mixed_model_takes_each_layer_s_own_type(tokenizer, tmp_path):
    model = quantized(tokenizer, bits=2, group_size=64, mix="kv4", int4_group_size=32)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer)
    kinds = {name: report.types[gguf_name(name)] for name in upq_layers(model)}
    assert {n for n, k in kinds.items() if k == "Q4_1"} == {n for n in kinds if n.endswith(("k_proj", "v_proj"))}
    assert {k for n, k in kinds.items() if not n.endswith(("k_proj", "v_proj"))} == {"Q4_0"}


def test_metadata_and_tokenizer_as_llama_cpp_writes_them(tokenizer, tmp_path):
    model = quantized(tokenizer, bits=2, group_size=32)
    export_gguf(model, tmp_path / "m.gguf", tokenizer)
    fields = {key: field.contents() for key, field in GGUFReader(tmp_path / "m.gguf").fields.items()
              if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}
    reader = GGUFReader(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.embedding_length"] == 64 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.chat_template"] == tokenizer.chat_template
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(tokenizer) and tokens[tokenizer.convert_tokens_to_ids("<|im_start|>")] == "<|im_start|>"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 1000
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reads token_embd


def test_a_layer_no_block_type_holds_is_an_error_or_written_dense(tokenizer, tmp_path):
    model = tiny_llama(vocab_size=len(tokenizer), intermediate_size=48)  # down_proj: rows of 48 inputs
    upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=16), progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has group size 16 \(a scale per "
                                         r"32-element block needs a multiple of 32, or the Q2_K grid: "
                                         r"scale_grid='q2_k'\): no llama.cpp type holds it exactly"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer)
    assert not list(tmp_path.iterdir())  # nothing half-written
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer, fallback="dense")
    assert len(report.fallbacks) == 14 and report.types["blk.0.ffn_down.weight"] == "F32"
    data, _ = read_back(tmp_path / "m.gguf")["blk.0.ffn_down.weight"]
    assert np.array_equal(data, upq_layers(model)["model.layers.0.mlp.down_proj"].dequantize(torch.float32).numpy())


def test_other_architectures_are_refused(tmp_path):
    from helpers import tiny_qwen

    model = upq_hf.quantize_model(tiny_qwen(), UPQConfig(bits=2, group_size=32), progress=False)
    with pytest.raises(ValueError, match="GGUF export knows the \\['llama'\\] architectures"):
        export_gguf(model, tmp_path / "m.gguf", object())


def test_the_cli_exports_a_checkpoint_folder(tokenizer, tmp_path, capsys):
    from upq_hf import cli

    model = quantized(tokenizer, bits=2, group_size=32)
    model.save_pretrained(tmp_path / "int2")
    tokenizer.save_pretrained(tmp_path / "int2")
    assert cli.main(["export", str(tmp_path / "int2"), "--gguf", str(tmp_path / "m.gguf")]) == 0
    assert "20 tensors (6 F32, 14 Q4_0)" in capsys.readouterr().out
    tensors = read_back(tmp_path / "m.gguf")
    for name, layer in upq_layers(model).items():
        assert np.array_equal(tensors[gguf_name(name)][0], expected(name, layer))


# ------------------------------------------------------------------------------------------------- the Q2_K grid

def test_the_q2_k_grid_holds_every_scale_exactly():
    from upq_hf import formats

    scale = torch.rand(5, 48, generator=torch.Generator().manual_seed(0)) * 0.05 + 1e-4
    on_grid = formats.q2_k_grid(scale)
    d = formats.q2_k_super_scale(scale)
    c = on_grid / d.repeat_interleave(16, dim=1)
    assert torch.equal(c, c.round()) and c.min() >= 1 and c.max() <= 15
    assert torch.equal(on_grid.half().float(), on_grid) and torch.equal((1.5 * d).half().float(), 1.5 * d)
    assert torch.equal(formats.q2_k_grid(on_grid), on_grid)  # a scale on the grid stays where it is
    step = d.repeat_interleave(16, dim=1)
    # the nearest multiple: within half a step, but for the scales under half a step (the grid's 15:1 range), at d
    assert bool(((on_grid - scale).abs() <= step / 2 + 1e-9)[scale >= step / 2].all())
    assert bool((on_grid == step)[scale < step / 2].all())


def wide(tokenizer, **config):
    """A tiny Llama with rows of 256 and 512 (Q2_K's super-blocks are 256 columns)."""
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512)
    return upq_hf.quantize_model(model, UPQConfig(**config), progress=False)


def test_int2_on_the_q2_k_grid_is_q2_k_bit_for_bit(tokenizer, tmp_path):
    model = wide(tokenizer, bits=2, group_size=16, scale_grid="q2_k")
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer)
    tensors = read_back(tmp_path / "m.gguf")
    for name, layer in upq_layers(model).items():
        data, kind = tensors[gguf_name(name)]
        assert kind == "Q2_K" and np.array_equal(data, expected(name, layer)), name
    reader = GGUFReader(tmp_path / "m.gguf")
    blocks = sum(t.n_bytes for t in reader.tensors if t.tensor_type.name == "Q2_K")
    weights = sum(m.in_features * m.out_features for m in upq_layers(model).values())
    assert 8 * blocks / weights == 2.625 and report.fallbacks == {}


def test_upq_trained_on_the_grid_exports_as_q2_k(tokenizer, tmp_path):
    """Block-wise PTQ and Distill-QAT train the scales on the grid: every layer of the result still is Q2_K."""
    texts = [f"Note {i}: the level of the tank is {i * 7 % 13} units today." for i in range(16)]
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512)
    config = UPQConfig(bits=2, group_size=16, scale_grid="q2_k", recipe="upq", int4_group_size=32,
                       data={"dataset": texts, "calibration_samples": 4, "calibration_seqlen": 16},
                       ptq={"epochs": 1, "batch_size": 2},
                       distill={"steps": 2, "batch_size": 2, "seqlen": 16, "samples": 2, "mixed_precision": "no"})
    upq_hf.quantize_model(model, config, tokenizer=tokenizer, progress=False)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer)
    assert {report.types[gguf_name(name)] for name in upq_layers(model)} == {"Q2_K"}


def test_the_grid_needs_its_format_and_its_rows(tokenizer):
    with pytest.raises(ValueError, match="it needs bits=2, group_size=16, scale_dtype='float16' and no mix"):
        UPQConfig(bits=2, group_size=32, scale_grid="q2_k")
    with pytest.raises(ValueError, match=r"needs INT2 rows whose length is a multiple of 256: model\.layers\.0\."
                                         r"self_attn\.q_proj has 64 inputs"):
        quantized(tokenizer, bits=2, group_size=16, scale_grid="q2_k")
