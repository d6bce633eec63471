"""Quantize on load (``upq_hf.streaming``): round-to-nearest tensor by tensor inside ``from_pretrained``."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import upq_hf  # noqa: F401  registers quant_method "upq"
from upq_hf import UPQConfig, UPQLinear, quantize_model, streaming
from upq_hf.convert import upq_layers

from helpers import tiny_llama

MIXED = dict(bits=2, group_size=16, int4_group_size=32,
             module_bits={r"\.(k|v)_proj$": 4, r"layers\.1\.mlp\.down_proj": {"bits": 2, "group_size": 32}})
IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 3]])


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """Biases on q/k/v and an untied head: every kind of tensor a linear or its neighbours hold."""
    from helpers import tiny_qwen

    path = tmp_path_factory.mktemp("qwen")
    tiny_qwen().save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_rtn_on_load_equals_dense_load_then_quantize_bit_for_bit(qwen_dir, dtype):
    on_load = AutoModelForCausalLM.from_pretrained(qwen_dir, quantization_config=UPQConfig(**MIXED), dtype=dtype)
    assert len(on_load.hf_quantizer.on_load_layers) == 14  # really quantized on load, not after
    dense = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=dtype)
    quantize_model(dense, UPQConfig(**MIXED), progress=False)
    formats = {n: (m.bits, m.group_size) for n, m in upq_layers(on_load).items()}
    assert formats == {n: (m.bits, m.group_size) for n, m in upq_layers(dense).items()}
    assert formats["model.layers.0.self_attn.v_proj"] == (4, 32) and formats["model.layers.0.self_attn.q_proj"] == (2, 16)
    assert formats["model.layers.1.mlp.down_proj"] == (2, 32) and formats["model.layers.0.mlp.down_proj"] == (2, 16)
    a, b = on_load.state_dict(), dense.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    with torch.no_grad():
        assert torch.equal(on_load(IDS).logits, dense(IDS).logits)


def test_each_weight_is_quantized_while_no_other_layer_holds_a_dense_weight(tiny_llama_dir, monkeypatch):
    seen = []
    original = streaming.UPQQuantizeOnLoad.convert

    def convert(self, input_dict, model=None, **kwargs):
        (key, value), = input_dict.items()
        dense = [name for name, m in model.named_modules() if isinstance(m, UPQLinear)
                 and m.weight.is_floating_point() and m.weight.device.type != "meta"]
        seen.append((key, tuple((value[0] if isinstance(value, list) else value).shape), dense))
        return original(self, input_dict, model=model, **kwargs)

    monkeypatch.setattr(streaming.UPQQuantizeOnLoad, "convert", convert)
    monkeypatch.setattr(upq_hf.recipes, "apply_recipe", lambda *a, **k: pytest.fail("no recipe runs after loading"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=UPQConfig(bits=4, group_size=32))
    assert len(seen) == 14 and all(dense == [] for _, _, dense in seen)
    assert ("model.layers.0.mlp.down_proj.weight", (64, 128), []) in seen
    layers = upq_layers(model)
    assert all(m.weight.dtype == torch.int32 and m.weight_zero.dtype == torch.float16 for m in layers.values())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tie kept


def test_recipes_that_need_the_dense_model_still_load_it_dense(tiny_llama_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(upq_hf.recipes, "apply_recipe", lambda model, config, run=None: calls.append(
        sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})) or model)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=UPQConfig(bits=2, recipe="ptq"))
    assert calls == [["Linear"]] and not model.hf_quantizer.on_load_layers  # dense nn.Linear when the recipe ran


def test_a_weight_missing_from_the_checkpoint_is_an_error_not_a_random_layer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 tensor to quantize is not in the checkpoint \(e.g. "
                                         r"model\.layers\.1\.mlp\.up_proj\.weight\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=UPQConfig(bits=2, group_size=32))


def test_save_and_reload_of_a_model_quantized_on_load(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=UPQConfig(**MIXED))
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not reloaded.hf_quantizer.on_load_layers  # a packed checkpoint loads as it is
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)
