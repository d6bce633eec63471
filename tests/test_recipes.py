"""The recipes end to end on a tiny Llama with the bundled tokenizer and in-memory text."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import upq_hf
from upq_hf import UPQConfig
from upq_hf.convert import upq_layers
from upq_hf.models import load_tokenizer

from helpers import tiny_llama

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


@pytest.mark.parametrize("recipe, mixed_precision", [("ptq", "auto"), ("ntp", "auto"), ("distill", "no"),
                                                     ("distill", "bf16")])
def test_recipes_produce_packed_int2(tokenizer, tmp_path, recipe, mixed_precision):
    """The quantized model in memory is the one that reloads: bf16 autocast (accelerate wraps the model's
    forward in it for training) must not stay on the model after training."""
    model = model_for(tokenizer)
    upq_hf.quantize_model(model, small(recipe=recipe, mixed_precision=mixed_precision), tokenizer=tokenizer,
                          progress=False)
    assert "_original_forward" not in model.__dict__
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


def test_from_pretrained_upq_keeps_int4_and_stays_marked_int2(tokenizer, tmp_path):
    """The INT4 restart save in the middle of ``upq`` must not leave the INT2 model marked INT4."""
    source = tmp_path / "dense"
    model_for(tokenizer).save_pretrained(source)
    tokenizer.save_pretrained(source)
    int4_dir = tmp_path / "int4"
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=small(recipe="upq", int4_checkpoint=str(int4_dir), int2_ptq=False))
    assert all(m.bits == 2 for m in upq_layers(model).values())
    assert model.config.quantization_config.bits == 2 and model.hf_quantizer.quantization_config.bits == 2
    int4 = AutoModelForCausalLM.from_pretrained(int4_dir)
    assert {m.bits for m in upq_layers(int4).values()} == {4}
    ids = torch.randint(0, len(tokenizer), (1, 12))
    model.save_pretrained(tmp_path / "int2")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "int2")(ids).logits, model(ids).logits)


def test_registry_is_what_config_cli_and_card_read(monkeypatch):
    from upq_hf import cli, recipes
    from upq_hf.publish import model_card

    assert list(recipes.RECIPES) == ["rtn", "ptq", "upq", "ntp", "distill"]
    assert [name for name, r in recipes.RECIPES.items() if r.trains] == ["upq", "ntp", "distill"]
    with pytest.raises(ValueError, match=r"recipe must be one of \['rtn', 'ptq', 'upq', 'ntp', 'distill'\]"):
        UPQConfig(recipe="gptq")
    # a recipe registered later is valid everywhere at once
    monkeypatch.setitem(recipes.RECIPES, "gptq", recipes.Recipe("gptq", lambda model, config, **_: model,
                                                                "second-order PTQ", trains=False))
    assert UPQConfig(recipe="gptq").recipe == "gptq"
    parser = cli.build_parser()
    quantize = next(a for a in parser._subparsers._group_actions[0].choices["quantize"]._actions
                    if a.dest == "recipe")
    assert quantize.choices == ["rtn", "ptq", "upq", "ntp", "distill", "gptq"]
    assert "gptq: second-order PTQ" in quantize.help
    card = model_card(UPQConfig(recipe="gptq").to_dict())
    assert "by the `gptq` recipe (second-order PTQ)." in card and "training budget" not in card
    assert "training budget" in model_card(UPQConfig(recipe="ntp").to_dict())


def test_recipe_saves_nothing_itself(tokenizer, tmp_path):
    from upq_hf import recipes

    with pytest.raises(ValueError, match="needs save_int4"):
        recipes.apply_recipe(model_for(tokenizer), small(recipe="upq", int4_checkpoint=str(tmp_path / "int4")),
                             tokenizer=tokenizer)
    assert not (tmp_path / "int4").exists()


def test_upq_restart_starts_int2_from_the_same_latent_weights(tokenizer, tmp_path):
    """A restart from the kept INT4 checkpoint reads the INT4 stage's latent weights and makes the same INT2
    model, code for code, as the run that made the checkpoint; without them it falls back to dithering."""
    from upq_hf import recipes

    int4_dir = tmp_path / "int4"
    cfg = dict(recipe="upq", int4_checkpoint=str(int4_dir), train_steps=1, mixed_precision="no")
    straight = model_for(tokenizer)
    upq_hf.quantize_model(straight, small(**cfg), tokenizer=tokenizer, progress=False)
    assert (int4_dir / recipes.LATENTS_FILE).is_file()
    latents = recipes.load_latents(str(int4_dir))
    assert set(latents) == set(upq_layers(straight)) and all(t.dtype == torch.float32 for t in latents.values())

    again = model_for(tokenizer)
    upq_hf.quantize_model(again, small(**cfg), tokenizer=tokenizer, progress=False)
    first, second = upq_layers(straight), upq_layers(again)
    for name in first:
        assert torch.equal(first[name].weight, second[name].weight), name
        assert torch.equal(first[name].weight_scale, second[name].weight_scale), name

    (int4_dir / recipes.LATENTS_FILE).unlink()
    assert recipes.load_latents(str(int4_dir)) is None
    third = model_for(tokenizer)
    upq_hf.quantize_model(third, small(**cfg), tokenizer=tokenizer, progress=False)
    assert all(m.bits == 2 for m in upq_layers(third).values())
