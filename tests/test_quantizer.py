"""The transformers plugin: quantize in from_pretrained, save packed, reload with plain from_pretrained."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import upq_hf
from upq_hf import UPQConfig, UPQLinear
from upq_hf.convert import upq_layers
from upq_hf.head import UPQHead

from helpers import tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 3], [4, 4, 8, 15, 16, 23, 42, 0]])


def load_quantized(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_save_reload_bit_identical(tiny_llama_dir, tmp_path, dtype, bits):
    model = load_quantized(tiny_llama_dir, quantization_config=UPQConfig(bits=bits, group_size=32), dtype=dtype)
    layers = upq_layers(model)
    assert len(layers) == 2 * 7  # q k v o gate up down per block
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, UPQLinear)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tie kept
    assert all(m.bits == bits and m.group_size == 32 for m in layers.values())
    with torch.no_grad():
        logits = model(IDS).logits
    assert logits.dtype == dtype
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "upq" and saved["bits"] == bits and saved["group_size"] == 32
    reloaded = load_quantized(tmp_path, dtype=dtype)  # no quantization_config: read from config.json
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, UPQLinear)
    for name, module in upq_layers(reloaded).items():
        assert torch.equal(module.weight, layers[name].weight)
        assert torch.equal(module.weight_scale, layers[name].weight_scale)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)


def test_checkpoint_holds_packed_weights_and_version(tiny_llama_dir, tmp_path):
    model = load_quantized(tiny_llama_dir, quantization_config=UPQConfig(bits=2, group_size=None))
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert f.metadata()["upq_format_version"] == "1"  # a Llama's layout is format 1's (upq_hf.packing)
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert q.dtype == torch.int32 and q.shape == (64 // 16, 64)
        assert s.dtype == torch.float16 and s.shape == (1, 64)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32


def test_bias_layers_qwen(tiny_qwen_dir, tmp_path):
    model = load_quantized(tiny_qwen_dir, quantization_config=UPQConfig(bits=4, group_size=16))
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path)(IDS).logits, logits)


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map(tiny_llama_dir, tmp_path, device_map):
    model = load_quantized(tiny_llama_dir, quantization_config=UPQConfig(bits=2), device_map=device_map)
    assert len(upq_layers(model)) == 14
    model.save_pretrained(tmp_path)
    reloaded = load_quantized(tmp_path, device_map=device_map)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_modules_to_not_convert_overrides_but_keeps_output_embedding(tiny_llama_dir, tmp_path):
    config = UPQConfig(bits=2, group_size=32, modules_to_not_convert=["mlp.down_proj", "self_attn.o_proj"])
    model = load_quantized(tiny_llama_dir, quantization_config=config)
    for block in model.model.layers:
        assert type(block.mlp.down_proj) is nn.Linear and type(block.self_attn.o_proj) is nn.Linear
        assert isinstance(block.mlp.up_proj, UPQLinear)
    assert type(model.lm_head) in (nn.Linear, UPQHead)  # dense (UPQHead: the same, int8 under a8 alone)
    model.save_pretrained(tmp_path)
    reloaded = load_quantized(tmp_path)
    assert type(reloaded.model.layers[0].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), r"bits must be one of \[2, 4\]"),
    (dict(bits=2, group_size=0), "group_size must be a positive integer"),
    (dict(bits=4, group_size=-64), "group_size must be a positive integer"),
    (dict(recipe="magic"), "recipe must be one of"),
    (dict(ptq_loss="l1"), "ptq_loss is no longer a setting: the reconstruction error is the token-relative one"),
    (dict(recipe="ptq", ptq={"holdout": 1.0}), r"PTQConfig: holdout is the share .* in \[0, 1\)"),
    (dict(recipe="ptq", ptq={"batch_size": 0}), "PTQConfig: batch_size must be a positive integer"),
    (dict(recipe="ptq", ptq={"epoch": 3}), r"PTQConfig has no field 'epoch' \(its fields: \["),
    (dict(recipe="upq", distill={"samples": 0}), "DistillConfig: samples must be a positive integer or None"),
    (dict(recipe="upq", distill={"teacher_topk": -1}), "DistillConfig: teacher_topk must be a non-negative integer"),
    (dict(recipe="upq", distill={"mixed_precision": "fp8"}), "DistillConfig: mixed_precision must be one of"),
    (dict(recipe="upq", distill={"head_learning_rate": -0.1}), "DistillConfig: head_learning_rate must be a non-negative"),
    (dict(recipe="upq", distill={"warmup": 1.0}), r"DistillConfig: warmup is the share .* in \[0, 1\)"),
    (dict(recipe="rtn", ptq={"epochs": 3}), r"recipe 'rtn' runs no 'ptq' stage \(its stages: \['rtn'\]\)"),
    (dict(ptq_epochs=6), r"ptq_epochs is now PTQConfig.epochs: UPQConfig\(ptq=\{'epochs': \.\.\.\}\)"),
    (dict(device="cuda"), "device is no longer a setting: an argument of quantize_model"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UPQConfig(**kwargs)


def test_group_size_not_dividing_a_layer_fails_before_anything_converts(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=64 of model\.layers\.0\."):
        load_quantized(tiny_llama_dir, quantization_config=UPQConfig(bits=2, group_size=48))
    model = tiny_llama(intermediate_size=96)  # down_proj has in_features 96: 64 divides the rest only
    with pytest.raises(ValueError, match=r"in_features=96 of model\.layers\.0\.mlp\.down_proj.*\[16, 32\]"):
        upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=64), progress=False)
    assert not upq_layers(model)  # nothing half-converted


def test_quantize_model_in_place_then_save(tmp_path):
    model = tiny_llama()
    upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=16), progress=False)
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path)(IDS).logits, logits)


def test_config_round_trips_through_json():
    config = UPQConfig(bits=4, group_size=128, rtn={"scale_init": "max"}, modules_to_not_convert=["x"])
    again = UPQConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict() and again.rtn.scale_init == "max"
    upq = UPQConfig(recipe="upq", ptq={"epochs": 6}, distill={"steps": 20}, seed=3)
    again = UPQConfig.from_dict(json.loads(json.dumps(upq.to_dict())))
    assert again.to_dict() == upq.to_dict() and (again.ptq.epochs, again.distill.steps, again.seed) == (6, 20, 3)
    assert set(upq.to_dict()["stages"]) == {"rtn", "data", "ptq", "distill", "e2e_qp"}
    assert set(config.to_dict()["stages"]) == {"rtn"}  # what the recipe runs


def test_an_older_config_json_reads_into_the_stages():
    """config.json of upq_hf 0.1: flat keys, retired settings, per-run keys saved as null."""
    old = {"quant_method": "upq", "bits": 2, "group_size": 64, "recipe": "upq", "scale_init": "mse",
           "scale_dtype": "float16", "modules_to_not_convert": None, "backend": None, "module_bits": None,
           "mix": "kv4", "format_version": 1, "dataset": "self", "self_prompts": None, "nsamples": 128, "seqlen": 128,
           "ptq_algorithm": "blockap", "ptq_epochs": 9, "ptq_batch_size": 8, "ptq_loss": "token", "ptq_holdout": 0.125,
           "int4_ptq_epochs": 1, "int4_group_size": 64, "int4_checkpoint": None, "int2_ptq": True,
           "int2_scale_init": "max", "train_steps": 30, "train_batch_size": 16, "train_seqlen": 128,
           "train_samples": 128, "teacher_topk": 64, "mixed_precision": "auto", "learning_rate": 0.02,
           "scale_learning_rate": 0.01, "beta": 0.0, "train_norms": True, "train_codes": True, "e2e_qp_steps": 0,
           "e2e_qp_learning_rate": 0.01, "temperature": 1.0, "work_dir": None, "resume": False, "device": None,
           "seed": 0}
    config = UPQConfig.from_dict(old)
    assert (config.ptq.epochs, config.distill.steps, config.distill.batch_size, config.data.calibration_samples) == \
        (9, 30, 16, 128)
    assert config.mix == "kv4" and config.format_version == 1 and not hasattr(config, "train_codes")


def test_newer_format_version_is_refused_clearly():
    with pytest.raises(ValueError, match="upgrade upq_hf"):
        UPQConfig(format_version=99)


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    upq_hf.register()
    upq_hf.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["upq"] is UPQConfig
    assert AUTO_QUANTIZER_MAPPING["upq"] is upq_hf.UPQHfQuantizer


def test_dequantize_back_to_dense(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("UPQ_BACKEND", "torch")  # the reference path is exact; the CPU kernel rounds x to bf16
    model = load_quantized(tiny_llama_dir, quantization_config=UPQConfig(bits=4, group_size=32))
    with torch.no_grad():
        logits = model(IDS).logits
    dense = model.dequantize()
    assert not upq_layers(dense) and isinstance(dense.model.layers[0].mlp.up_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, logits, rtol=1e-5, atol=1e-5)


def test_corrupt_checkpoint_gives_clear_error(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = load_quantized(tiny_llama_dir, quantization_config=UPQConfig(bits=2, group_size=32))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:2]
    save_file(tensors, path, metadata={"format": "pt", "upq_format_version": "1"})
    with pytest.raises(ValueError, match=r"corrupt .*layers\.0\.self_attn\.q_proj\.weight: I32\[2, 64\]"):
        load_quantized(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])  # truncated file
    with pytest.raises(ValueError, match="corrupt UPQ checkpoint file"):
        load_quantized(tmp_path)


def test_head_takes_contiguous_input_in_generate(tiny_llama_dir, tmp_path):
    """generate's first step gives the head the last position of each row, a strided view; for a bf16 head on a CPU
    torch's F.linear then copies the weight once per row. UPQ models (loaded, reloaded, quantized in place) and
    every model upq_hf generates with get a pre-hook that makes the input contiguous: the same logits."""
    from upq_hf.chat import contiguous_head_input

    model = load_quantized(tiny_llama_dir, quantization_config=UPQConfig(bits=2, group_size=32), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    contiguous_head_input(dense)
    contiguous_head_input(dense)  # once per model
    for m in (model, load_quantized(tmp_path), dense):
        head = m.get_output_embeddings()
        assert head._upq_contiguous_input and len(head._forward_pre_hooks) == 1
        seen = []
        handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        hidden = torch.randn(3, 5, head.in_features, dtype=head.weight.dtype)
        strided = hidden[:, -1:, :]
        assert not strided.is_contiguous()
        with torch.no_grad():
            assert torch.equal(head(strided), torch.nn.functional.linear(strided.contiguous(), head.weight))
        handle.remove()
        assert seen == [True]
