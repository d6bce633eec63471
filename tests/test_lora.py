"""PEFT LoRA on UPQ INT2 layers: placement, a Trainer run with frozen codes, save/reload, no merge."""

import pytest
import torch

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import upq_hf
from upq_hf import UPQConfig, UPQLinear
from upq_hf.convert import upq_layers
from upq_hf.head import UPQHead
from upq_hf.lora import UPQLoraLinear, UPQMergeError, register_peft, target_modules, unregister_peft

from helpers import tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 3], [4, 4, 8, 15, 16, 23, 42, 0]])
NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
# tiny_llama: hidden 64, 4 heads of 16, 2 kv heads (k/v out 32), intermediate 128, 2 layers
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}  # (in, out)
PATTERN = [3, 17, 42, 8, 99, 23, 64, 5, 71, 12, 36, 120, 50, 7, 88, 29]  # the learnable "language"


@pytest.fixture(scope="module")
def int2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-int2")
    model = upq_hf.quantize_model(tiny_llama(), UPQConfig(bits=2, group_size=32), progress=False)
    model.save_pretrained(path)
    return str(path)


def fresh(int2_dir):
    """A freshly loaded INT2 model: the saved UPQ checkpoint through plain from_pretrained."""
    return AutoModelForCausalLM.from_pretrained(int2_dir).eval()


def packed_state(model):
    """Every UPQLinear's buffers (codes, scales), keyed by the layer's name in the plain model."""
    state = {}
    for name, module in upq_layers(model).items():
        name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        state[name] = {k: v.clone() for k, v in module.named_buffers()}
    return state


def logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


class Repeats(torch.utils.data.Dataset):
    """One fixed 16-token pattern, repeated, cut at random offsets: learnable in a few steps."""

    def __init__(self, n=64, length=24):
        gen = torch.Generator().manual_seed(0)
        seq = torch.tensor(PATTERN * 4)
        self.rows = [seq[o:o + length] for o in torch.randint(0, len(PATTERN), (n,), generator=gen).tolist()]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


@pytest.fixture(scope="module")
def trained(int2_dir, tmp_path_factory):
    """One Trainer run (20 steps) shared by the tests that need trained adapters."""
    torch.manual_seed(0)
    model = fresh(int2_dir)
    before = packed_state(model)
    base_logits = logits(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules(model)))
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("trainer")), max_steps=20,
                             per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0)
    trainer = Trainer(model=peft_model, args=args, train_dataset=Repeats())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peft_model.eval()
    adapter_dir = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(adapter_dir)
    return {"model": peft_model, "before": before, "base_logits": base_logits, "losses": losses,
            "adapter_dir": str(adapter_dir)}


def test_adapters_land_on_upq_layers(int2_dir):
    model = fresh(int2_dir)
    assert target_modules(model) == NAMES
    r = 4
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=NAMES))
    wrapped = {n: m for n, m in peft_model.named_modules() if isinstance(m, UPQLoraLinear)}
    assert len(wrapped) == 2 * len(NAMES)
    assert all(isinstance(m.get_base_layer(), UPQLinear) for m in wrapped.values())
    expected = 2 * sum(r * (n_in + n_out) for n_in, n_out in SHAPES.values())  # A: r x in, B: out x r
    assert expected == 8192
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # "all-linear" finds the same layers (PEFT alone finds none: a UPQLinear is not an nn.Linear)
    other = get_peft_model(fresh(int2_dir), LoraConfig(r=r, target_modules="all-linear"))
    assert {n for n, m in other.named_modules() if isinstance(m, UPQLoraLinear)} == set(wrapped)
    assert type(other.base_model.model.lm_head) in (nn.Linear, UPQHead)  # output embedding left alone


def test_trainer_lowers_loss_and_keeps_codes_bit_identical(trained):
    losses = trained["losses"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    after = packed_state(trained["model"])
    assert after.keys() == trained["before"].keys() and len(after) == 14
    for name, buffers in trained["before"].items():
        assert set(buffers) == {"weight", "weight_scale"}
        for key, value in buffers.items():
            assert torch.equal(after[name][key], value), (name, key)


def test_adapter_reloads_onto_fresh_int2_model(trained, int2_dir):
    expected = logits(trained["model"])
    assert not torch.equal(expected, trained["base_logits"])  # the adapter does something
    reloaded = PeftModel.from_pretrained(fresh(int2_dir), trained["adapter_dir"])
    assert sum(isinstance(m, UPQLoraLinear) for m in reloaded.modules()) == 14
    assert torch.equal(logits(reloaded), expected)


def test_reload_needs_the_registration(trained, int2_dir):
    unregister_peft()
    try:
        with pytest.raises(ValueError, match="not supported"):
            PeftModel.from_pretrained(fresh(int2_dir), trained["adapter_dir"])
    finally:
        register_peft()
    assert torch.equal(logits(PeftModel.from_pretrained(fresh(int2_dir), trained["adapter_dir"])),
                       logits(trained["model"]))


def test_disabled_adapters_give_the_base_model(trained):
    model = trained["model"]
    with model.disable_adapter():
        assert torch.equal(logits(model), trained["base_logits"])
    assert not torch.equal(logits(model), trained["base_logits"])


def test_merge_is_refused_and_leaves_the_model_intact(trained, int2_dir):
    model = PeftModel.from_pretrained(fresh(int2_dir), trained["adapter_dir"])
    expected = logits(model)
    with pytest.raises(UPQMergeError, match="re-quantize.*unload\\(\\).*dequantize"):
        model.merge_and_unload()
    with pytest.raises(UPQMergeError):
        model.merge_adapter()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(UPQMergeError):
        layer.merge()
    with pytest.raises(UPQMergeError):
        layer.unmerge()
    assert sum(isinstance(m, UPQLoraLinear) for m in model.modules()) == 14
    assert torch.equal(logits(model), expected)
    # the two ways out the message names
    base = model.unload()
    assert isinstance(base.model.layers[0].self_attn.q_proj, UPQLinear)
    assert torch.equal(logits(base), trained["base_logits"])


def test_dequantize_then_merge(trained, int2_dir, monkeypatch):
    monkeypatch.setenv("UPQ_BACKEND", "torch")  # the reference path is exact; the CPU kernel rounds x to bf16
    model = PeftModel.from_pretrained(fresh(int2_dir), trained["adapter_dir"])
    expected = logits(model)
    model.dequantize()
    assert not upq_layers(model)
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)


def test_several_adapters_and_mixed_batches(trained, int2_dir):
    model = PeftModel.from_pretrained(fresh(int2_dir), trained["adapter_dir"], adapter_name="a")
    model.load_adapter(trained["adapter_dir"], adapter_name="b")
    model.add_adapter("zero", LoraConfig(r=2, target_modules=NAMES))  # B starts at zero: a no-op adapter
    with_a = logits(model)
    model.set_adapter("zero")
    assert torch.equal(logits(model), trained["base_logits"])
    model.set_adapter("b")
    assert torch.equal(logits(model), with_a)
    mixed = logits(model, adapter_names=["a", "__base__"])
    torch.testing.assert_close(mixed[0], with_a[0])
    torch.testing.assert_close(mixed[1], trained["base_logits"][1])


def test_half_precision_model_trains_adapters_in_float32(int2_dir):
    model = AutoModelForCausalLM.from_pretrained(int2_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=NAMES))
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    out = peft_model(IDS, labels=IDS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(grads) == 28 and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_lora_variants_are_refused(int2_dir):
    with pytest.raises(ValueError, match="plain LoRA only"):
        get_peft_model(fresh(int2_dir), LoraConfig(r=4, target_modules=NAMES, use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights"):
        get_peft_model(fresh(int2_dir), LoraConfig(r=4, target_modules=NAMES, init_lora_weights="pissa"))


def test_per_config_registration(int2_dir):
    """PEFT's experimental per-config hook, for code that bypasses the registry (LoraModel(...) by hand)."""
    from peft.tuners.lora import LoraModel

    config = register_peft(LoraConfig(r=4, target_modules=NAMES))
    model = LoraModel(fresh(int2_dir), config, "default")
    assert sum(isinstance(m, UPQLoraLinear) for m in model.modules()) == 14
