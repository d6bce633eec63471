"""The family matrix: every family of tests/families.py through every stage, on tiny random models (no hub).

Each family: INT2 and INT4 round to nearest on load, equal bit for bit to quantizing the dense model in memory,
every decoder weight quantized but the documented exceptions (routers), save + plain ``from_pretrained`` with
logits bit-equal, ``generate``; ``ptq`` and ``upq`` at a tiny budget; the ``kv4`` mix placing k/v at INT4 by role,
fused or not; LoRA with the codes unchanged; the avx2 CPU backend equal to the reference.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import upq_hf
from upq_hf import UPQConfig, adapters, formats
from upq_hf.convert import upq_layers

from families import COLUMNS, FAMILIES, build, supported_models_table

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[3, 5, 9, 2, 7, 11, 4, 8]])
BY_NAME = {family.name: family for family in FAMILIES}
names = pytest.mark.parametrize("name", list(BY_NAME))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    """Each family's tiny dense model saved once (the checkpoint layout transformers writes for it)."""
    saved = {}

    def get(name):
        if name not in saved:
            path = tmp_path_factory.mktemp(re.sub(r"\W", "", name.lower()))
            build(BY_NAME[name]).save_pretrained(path)
            saved[name] = str(path)
        return saved[name]
    return get


def check_all_quantized(model):
    """Every matrix UPQ quantizes is a UPQLinear; the only dense decoder weights are the documented exceptions."""
    assert adapters.targets(model) == {}
    kept = adapters.dense_decoder_weights(model)
    assert all(w.reason == "router" for w in kept), [w for w in kept if w.reason != "router"]
    quantized = sum(m.in_features * m.out_features for m in upq_layers(model).values())
    documented = sum(w.numel for w in kept)
    return quantized, documented


@names
@pytest.mark.parametrize("bits", [2, 4])
def test_round_to_nearest_on_load(name, bits, dense_dirs, tmp_path):
    family = BY_NAME[name]
    config = UPQConfig(bits=bits, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(dense_dirs(name), quantization_config=config).eval()
    quantized, routers = check_all_quantized(model)
    assert (routers > 0) == family.moe  # the routers, and only they, stay dense
    assert all(m.bits == bits for m in upq_layers(model).values())
    # the same as quantizing the dense model in memory, bit for bit
    in_memory = upq_hf.quantize_model(build(family), UPQConfig(bits=bits, group_size=32), progress=False)
    expected = logits(in_memory)
    assert torch.equal(logits(model), expected)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded), expected)
    out = reloaded.generate(IDS[:, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_moe_experts_are_quantized_one_by_one(dense_dirs):
    """Mixtral: 4 experts x (gate_up_proj, down_proj) x 2 blocks become 16 UPQLinear, each expert's matrix quantized
    as its own rows and groups (its codes and scales those of the expert's slice of the fused parameter)."""
    dense = build(BY_NAME["Mixtral"])
    fused = dense.model.layers[1].mlp.experts.down_proj.detach().clone()  # (4, 64, 128)
    model = AutoModelForCausalLM.from_pretrained(dense_dirs("Mixtral"), quantization_config=UPQConfig(
        bits=2, group_size=32)).eval()
    experts = [n for n in upq_layers(model) if ".experts." in n]
    assert len(experts) == 16 and "model.layers.1.mlp.experts.3.down_proj" in experts
    layer = model.get_submodule("model.layers.1.mlp.experts.3.down_proj")
    qw = formats.quantize(fused[3], 2, 32, "mse", torch.float16)
    assert torch.equal(layer.codes(), qw.codes) and torch.equal(layer.weight_scale.t(), qw.scale)


# hand-read from each family's attention code for the tiny config (4 heads of 16, 2 kv heads where grouped)
KV_ROWS = {
    "Phi-3": (torch.arange(64, 96), torch.arange(96, 128)),  # [q 64 | k 32 | v 32]
    "GPT-NeoX": (torch.cat([torch.arange(48 * h + 16, 48 * h + 32) for h in range(4)]),
                 torch.cat([torch.arange(48 * h + 32, 48 * h + 48) for h in range(4)])),  # per head [q k v]
    "Bloom": (torch.cat([torch.arange(48 * h + 16, 48 * h + 32) for h in range(4)]),
              torch.cat([torch.arange(48 * h + 32, 48 * h + 48) for h in range(4)])),
    "Falcon": (torch.arange(64, 80), torch.arange(80, 96)),  # multi-query: [q 64 | k 16 | v 16]
    "GPT-BigCode": (torch.arange(64, 80), torch.arange(80, 96)),
    "GPT-2": (torch.arange(64, 128), torch.arange(128, 192)),  # c_attn: [q | k | v], stored (in, out)
}


@names
def test_kv4_mix_finds_k_and_v_by_role(name, dense_dirs, tmp_path):
    family = BY_NAME[name]
    config = UPQConfig(bits=2, group_size=32, mix="kv4", int4_group_size=32)
    model = AutoModelForCausalLM.from_pretrained(dense_dirs(name), quantization_config=config).eval()
    check_all_quantized(model)
    layers = upq_layers(model)
    kv = {n for n in layers if re.search(r"\.(k|v)_proj$", n)}
    assert kv and all(layers[n].bits == 4 for n in kv)
    assert all(m.bits == 2 for n, m in layers.items() if n not in kv)
    if name in KV_ROWS:  # a fused projection: the k and v rows of the dense weight, INT4 round to nearest
        dense = build(family)
        source = next(n.rpartition(".")[0] for n in kv)
        weight = dense.get_submodule(source).weight.detach()
        weight = weight.t() if name == "GPT-2" else weight
        for role, rows in zip(("k_proj", "v_proj"), KV_ROWS[name]):
            expected = formats.quantize(weight[rows], 4, 32, "mse", torch.float16)
            assert torch.equal(layers[f"{source}.{role}"].dequantize(torch.float32), formats.dequantize(expected))
    bits_per_weight = sum(m.bits_per_weight * m.in_features * m.out_features for m in layers.values()) / sum(
        m.in_features * m.out_features for m in layers.values())
    assert 2.0 < bits_per_weight <= 3.0
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(model))


TEXTS = [f"Note {i}: the {w} of the {v} is {i * 7 % 13} units, and it keeps changing every day."
         for i, (w, v) in enumerate([("height", "tree"), ("weight", "box"), ("price", "apple"), ("age", "cat")] * 4)]
TINY = dict(data={"dataset": TEXTS, "calibration_samples": 4, "calibration_seqlen": 16},
            ptq={"epochs": 1, "batch_size": 2},
            distill={"steps": 1, "batch_size": 2, "seqlen": 16, "samples": 2, "teacher_topk": 8,
                     "mixed_precision": "no"})


@pytest.fixture(scope="module")
def tokenizer():
    from upq_hf.models import load_tokenizer

    return load_tokenizer(None)


@names
@pytest.mark.parametrize("recipe", ["ptq", "upq"])
def test_data_recipes_at_a_tiny_budget(name, recipe, tokenizer, tmp_path):
    family = BY_NAME[name]
    model = build(family, vocab_size=len(tokenizer))
    config = UPQConfig(bits=2, group_size=32, int4_group_size=32, recipe=recipe, mix=None, **TINY,
                       e2e_qp={"steps": 1})  # every stage: the reconstruction, Distill-QAT (upq), E2E-QP
    upq_hf.quantize_model(model, config, tokenizer=tokenizer, progress=False)
    check_all_quantized(model)
    assert all(m.bits == 2 for m in upq_layers(model).values())
    ids = torch.randint(0, len(tokenizer), (1, 6), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), logits(model, ids))


@names
def test_lora_trains_with_codes_unchanged(name, dense_dirs):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(dense_dirs(name), quantization_config=UPQConfig(
        bits=2, group_size=32)).eval()
    packed = {n: [b.clone() for b in m.buffers()] for n, m in upq_layers(model).items()}
    before = logits(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    wrapped = {n for n in upq_layers(peft_model)}
    assert len(wrapped) == len(packed)  # every quantized layer carries an adapter
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):
        loss = peft_model(IDS, labels=IDS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): [b for b in m.buffers()]
             for n, m in upq_layers(peft_model).items()}
    assert all(torch.equal(x, y) for n in packed for x, y in zip(packed[n], after[n]))
    with torch.no_grad():
        assert not torch.equal(peft_model(IDS).logits, before)


@names
def test_avx2_backend_equals_the_reference(name, dense_dirs):
    from upq_hf import avx2

    if avx2.unavailable_reason() is not None:
        pytest.skip(f"no avx2 kernel here: {avx2.unavailable_reason()}")
    model = AutoModelForCausalLM.from_pretrained(dense_dirs(name), quantization_config=UPQConfig(
        bits=2, group_size=32, backend="avx2")).eval()
    reference = copy.deepcopy(model)
    for layer in upq_layers(reference).values():
        layer.backend = "torch"
    for ids in (IDS[:, :1], IDS):  # a decode step (the kernel) and a prompt
        assert torch.allclose(logits(model, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)


def test_readme_table_is_the_matrix():
    """README's "Supported models" table is the one tests/families.py renders (python tests/families.py)."""
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert supported_models_table() in readme
    assert set(COLUMNS) >= {"rtn", "ptq", "upq", "kv4 mix", "LoRA", "backends"}


@pytest.mark.parametrize("name", ["Mixtral", "GPT-2"])
def test_info_reports_the_decoder_share_quantized(name, dense_dirs, tmp_path):
    from upq_hf.checkpoint import checkpoint_info

    model = AutoModelForCausalLM.from_pretrained(dense_dirs(name), quantization_config=UPQConfig(bits=2, group_size=32))
    model.save_pretrained(tmp_path)
    info = checkpoint_info(str(tmp_path))
    quantized, routers = check_all_quantized(model)
    assert info["decoder_quantized_fraction"] == pytest.approx(quantized / (quantized + routers))
    assert set(info["decoder_dense_weights"].values()) <= {"router"}
    assert len(info["decoder_dense_weights"]) == (2 if BY_NAME[name].moe else 0)  # one router per block


@pytest.mark.parametrize("name, mix", [("Mixtral", None), ("GPT-OSS", None), ("Phi-3", "kv4"), ("GPT-NeoX", "kv4"),
                                       ("GPT-2", None), ("GPT-2", "kv4"), ("Falcon", "kv4")])
def test_dequantize_gives_the_family_layout_back(name, mix, dense_dirs, tmp_path):
    """``model.dequantize()`` stacks the experts and fuses the split roles again: the dense model saves and loads
    without upq_hf's layouts, with the same logits."""
    config = UPQConfig(bits=2, group_size=32, mix=mix, int4_group_size=32, backend="torch")  # float32 throughout
    model = AutoModelForCausalLM.from_pretrained(dense_dirs(name), quantization_config=config).eval()
    quantized = logits(model)
    model.dequantize()
    assert not any(isinstance(m, (adapters.ExpertLinears, adapters.RoleSplitLinear)) for m in model.modules())
    assert upq_layers(model) == {}
    assert torch.allclose(logits(model), quantized, atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # a dense model to train, as loaded
    model.save_pretrained(tmp_path)
    dense = build(BY_NAME[name])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # the family's own loader, no UPQ in the way
    shapes = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in reloaded.state_dict().items()} == shapes
    assert torch.allclose(logits(reloaded), quantized, atol=1e-5, rtol=1e-4)


def _drop_from_checkpoint(folder, prefix):
    from safetensors.torch import load_file, save_file

    path = f"{folder}/model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if not k.startswith(prefix)}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("name, prefix, mix", [
    ("Mixtral", "model.layers.1.block_sparse_moe.experts.", None),  # the family's per-expert checkpoint names
    ("GPT-NeoX", "gpt_neox.layers.1.attention.query_key_value.", "kv4"),
    ("Llama", "model.layers.1.self_attn.k_proj.", None)])
def test_a_tensor_missing_from_the_checkpoint_is_an_error(name, prefix, mix, tmp_path):
    build(BY_NAME[name]).save_pretrained(tmp_path)
    _drop_from_checkpoint(tmp_path, prefix)
    with pytest.raises(ValueError, match="to quantize (is|are) not in the checkpoint"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=UPQConfig(bits=2, group_size=32, mix=mix))


@pytest.mark.parametrize("name, skip, mix", [("Mixtral", "experts.0.down_proj", None),
                                             ("Phi-3", "qkv_proj.k_proj", "kv4"),
                                             ("GPT-2", "c_attn.v_proj", "kv4")])
def test_an_expert_or_a_role_kept_dense(name, skip, mix, dense_dirs, tmp_path):
    """``modules_to_not_convert`` naming one expert's projection or one role of a fused projection: that layer
    stays dense (its weight the dense slice), the rest is quantized, on load as in memory."""
    config = dict(bits=2, group_size=32, mix=mix, int4_group_size=32, modules_to_not_convert=[skip])
    model = AutoModelForCausalLM.from_pretrained(dense_dirs(name), quantization_config=UPQConfig(**config)).eval()
    kept = [n for n, m in model.named_modules() if n.endswith(skip)]
    assert kept and all(type(model.get_submodule(n)) is torch.nn.Linear for n in kept)
    in_memory = upq_hf.quantize_model(build(BY_NAME[name]), UPQConfig(**config), progress=False)
    assert torch.equal(logits(model), logits(in_memory))
    model.save_pretrained(tmp_path)
    # the dense layer reloads memory-mapped from the file, 8 bytes off a 64-byte boundary: the CPU's matmul sums in
    # another order there (a copy of the same tensor gives the in-memory result bit for bit)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(in_memory), rtol=0,
                          atol=1e-6)


def test_a_format_1_checkpoint_still_loads(tmp_path):
    """Format 1 (upq_hf before 0.2) knew nn.Linear alone: a Mixtral's attention quantized, its experts dense and
    saved in the family's own checkpoint layout. It loads as it was."""
    from upq_hf import convert
    from upq_hf.quantizer import attach

    model = build(BY_NAME["Mixtral"])
    config = UPQConfig(bits=2, group_size=32)
    convert.quantize_linears_rtn(model, 2, 32, canonical=False)  # what format 1 quantized
    expected = logits(model)
    attach(model, config)
    assert config.format_version == 1  # attach finds nothing format 1 cannot hold; saved in the family's layout
    model.save_pretrained(tmp_path)
    assert any(".experts.0.w1.weight" in k for k in __import__("safetensors").safe_open(
        f"{tmp_path}/model.safetensors", "pt").keys())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config.format_version == 1
    assert torch.equal(logits(reloaded), expected)


def test_format_2_only_where_the_layout_changed(dense_dirs, tmp_path):
    from safetensors import safe_open

    for name, version in (("Llama", "1"), ("Mixtral", "2"), ("GPT-2", "2")):
        model = AutoModelForCausalLM.from_pretrained(dense_dirs(name), quantization_config=UPQConfig(bits=2,
                                                                                                    group_size=32))
        model.save_pretrained(tmp_path / name)
        with safe_open(f"{tmp_path / name}/model.safetensors", "pt") as f:
            assert f.metadata()["upq_format_version"] == version
        assert AutoModelForCausalLM.from_pretrained(tmp_path / name).config.quantization_config.format_version == \
            int(version)


def test_upq_int4_stage_of_a_split_projection_restarts(tokenizer, tmp_path, monkeypatch):
    """Phi-3 under kv4: the INT4 stage runs on the split q/k/v (one format); its kept state holds them split, and a
    second run restarts from it."""
    family = BY_NAME["Phi-3"]
    config = dict(bits=2, group_size=32, int4_group_size=32, recipe="upq", mix="kv4",
                  **{**TINY, "ptq": {**TINY["ptq"], "int4_epochs": 1}})  # the INT4 stage, off by default
    keep = str(tmp_path / "int4")
    upq_hf.quantize_model(build(family, vocab_size=len(tokenizer)), UPQConfig(**config), tokenizer=tokenizer,
                          keep_int4=keep, progress=False)
    from safetensors import safe_open

    with safe_open(f"{keep}/int4_stage.safetensors", "pt") as handle:
        assert "model.layers.0.self_attn.qkv_proj.k_proj.weight" in set(handle.keys())
    from upq_hf import recipes

    calls, real = [], recipes._ptq
    monkeypatch.setattr(recipes, "_ptq", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    again = upq_hf.quantize_model(build(family, vocab_size=len(tokenizer)), UPQConfig(**config), tokenizer=tokenizer,
                                  keep_int4=keep, progress=False)
    assert calls == [2]  # restarted from the kept INT4 stage
    check_all_quantized(again)


def test_to_qat_of_a_dense_model_takes_every_family_layout():
    from upq_hf.qat import QATLinear, to_qat

    for name in ("GPT-2", "Mixtral"):
        model = build(BY_NAME[name])
        swapped = to_qat(model, bits=2, group_size=32)
        assert adapters.targets(model) == {} and len(swapped) == sum(
            isinstance(m, QATLinear) for m in model.modules())


def test_experts_of_an_unknown_class_are_refused():
    """3-D expert weights of a class off transformers' experts interface (as Llama 4's): UPQ cannot tell their
    orientation nor their gate, so it says so instead of quantizing them wrong or leaving them dense."""
    model = build(BY_NAME["Llama"])
    block = model.model.layers[0]
    block.mlp.experts = torch.nn.Module()
    block.mlp.experts.gate_up_proj = torch.nn.Parameter(torch.randn(2, 64, 256))
    block.mlp.experts.down_proj = torch.nn.Parameter(torch.randn(2, 128, 64))
    with pytest.raises(ValueError, match="does not know how to quantize Module in this llama model"):
        upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=32))
