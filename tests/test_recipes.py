"""The recipes end to end on a tiny Llama with the bundled tokenizer and in-memory text."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import upq_hf
from upq_hf import UPQConfig
from upq_hf.convert import upq_layers
from upq_hf.models import load_tokenizer

from conftest import tiny_llama

TEXTS = [f"Note {i}: the {w} of the {v} is {i * 7 % 13} units, and it keeps changing every day."
         for i, (w, v) in enumerate([("height", "tree"), ("weight", "box"), ("price", "apple"), ("age", "cat")] * 6)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def small(**kw):
    base = dict(bits=2, group_size=32, dataset=TEXTS, nsamples=4, seqlen=32, ptq_epochs=1, train_steps=2,
                train_batch_size=2, train_seqlen=32, int4_group_size=32)
    base.update(kw)
    return UPQConfig(**base)


def model_for(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), initializer_range=0.1)


@pytest.mark.parametrize("recipe", ["ptq", "ntp", "distill"])
def test_recipes_produce_packed_int2(tokenizer, tmp_path, recipe):
    model = model_for(tokenizer)
    upq_hf.quantize_model(model, small(recipe=recipe), tokenizer=tokenizer, progress=False)
    layers = upq_layers(model)
    assert len(layers) == 14 and all(m.bits == 2 and m.group_size == 32 for m in layers.values())
    ids = torch.randint(0, len(tokenizer), (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, logits)


def test_upq_keeps_int4_and_restarts_from_it(tokenizer, tmp_path, monkeypatch):
    int4_dir = tmp_path / "int4"
    model = model_for(tokenizer)
    upq_hf.quantize_model(model, small(recipe="upq", int4_checkpoint=str(int4_dir)), tokenizer=tokenizer,
                          progress=False)
    assert all(m.bits == 2 for m in upq_layers(model).values())
    int4 = AutoModelForCausalLM.from_pretrained(int4_dir)
    assert all(m.bits == 4 and m.group_size == 32 for m in upq_layers(int4).values())

    from upq_hf import recipes

    calls = []
    monkeypatch.setattr(recipes, "_ptq", lambda *a, **k: calls.append(a[3]) or __import__("upq_hf.ptq").ptq)
    again = model_for(tokenizer)
    upq_hf.quantize_model(again, small(recipe="upq", int4_checkpoint=str(int4_dir), int2_ptq=False),
                          tokenizer=tokenizer, progress=False)
    assert calls == []  # INT4 stage skipped: restarted from the kept checkpoint
    assert all(m.bits == 2 for m in upq_layers(again).values())


def test_int4_only_recipes_reject_bits_4(tokenizer):
    with pytest.raises(ValueError, match="produces INT2"):
        upq_hf.quantize_model(model_for(tokenizer), small(recipe="ntp", bits=4), tokenizer=tokenizer)


def test_gpu_only_option_without_gpu_is_a_clear_error(tokenizer):
    if torch.cuda.is_available():
        pytest.skip("about machines without a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        upq_hf.quantize_model(model_for(tokenizer), small(recipe="ptq", device="cuda"), tokenizer=tokenizer)


def test_unknown_dataset_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="unknown dataset"):
        upq_hf.quantize_model(model_for(tokenizer), small(recipe="ptq", dataset="no-such-dataset-xyz"),
                              tokenizer=tokenizer)
