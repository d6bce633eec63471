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


STAGES = dict(data={"dataset": TEXTS, "calibration_samples": 4, "calibration_seqlen": 32}, ptq={"epochs": 1},
              distill={"steps": 2, "batch_size": 2, "seqlen": 32, "samples": 8})


def small(recipe="ptq", **kw):
    """A tiny budget for ``recipe`` at uniform INT2: the stages it runs get theirs, overridden by ``kw`` (stage
    dicts merge)."""
    from upq_hf.recipes import RECIPES

    values = {stage: dict(fields) for stage, fields in STAGES.items() if stage in RECIPES[recipe].stages}
    values.update(bits=2, group_size=32, int4_group_size=32, recipe=recipe, mix=None)
    for key, value in kw.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return UPQConfig(**values)


INT4_STAGE = {"int4_epochs": 1}  # upq's INT4 stage, off by default (docs/BENCHMARKS.md, "What the INT4 stage buys")


def model_for(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), initializer_range=0.1)


@pytest.mark.parametrize("recipe, mixed_precision", [("ptq", "auto"), ("ntp", "auto"), ("distill", "no"),
                                                     ("distill", "bf16")])
def test_recipes_produce_packed_int2(tokenizer, tmp_path, recipe, mixed_precision):
    """The quantized model in memory is the one that reloads: bf16 autocast (accelerate wraps the model's
    forward in it for training) must not stay on the model after training."""
    model = model_for(tokenizer)
    upq_hf.quantize_model(model, small(recipe, distill={"mixed_precision": mixed_precision}), tokenizer=tokenizer,
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
    upq_hf.quantize_model(model, small("upq", ptq=INT4_STAGE), tokenizer=tokenizer, keep_int4=str(int4_dir),
                          progress=False)
    assert all(m.bits == 2 for m in upq_layers(model).values())
    assert (int4_dir / "int4_stage.safetensors").is_file()

    from upq_hf import recipes

    calls = []
    real = recipes._ptq
    monkeypatch.setattr(recipes, "_ptq", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    again = model_for(tokenizer)
    upq_hf.quantize_model(again, small("upq", ptq=INT4_STAGE), tokenizer=tokenizer, keep_int4=str(int4_dir),
                          progress=False)
    assert calls == [2]  # the INT4 stage skipped: restarted from the kept state; the INT2 stage ran
    assert all(m.bits == 2 for m in upq_layers(again).values())
    calls.clear()
    other = model_for(tokenizer)  # other settings: the kept state is not theirs, the INT4 stage runs again
    upq_hf.quantize_model(other, small("upq", ptq={"int4_epochs": 2}), tokenizer=tokenizer, keep_int4=str(int4_dir),
                          progress=False)
    assert calls == [4, 2]


def test_upq_without_its_int4_stage_is_ptq_then_the_same_distillation(tokenizer):
    """``int4_epochs=0``: block-wise PTQ from the unquantized weights, then the scales distilled: recipe ``ptq``
    with E2E-QP at the distillation's steps and rate computes the same model (both turned: upq's default
    ``rotation="auto"`` rotates this Llama, ``ptq`` is asked for the same rotation)."""
    torch.manual_seed(0)
    no_int4 = model_for(tokenizer)
    pair = AutoModelForCausalLM.from_config(no_int4.config)
    pair.load_state_dict(no_int4.state_dict())
    upq_hf.quantize_model(no_int4, small("upq", ptq={"int4_epochs": 0}), tokenizer=tokenizer, progress=False)
    distill = small("upq").distill
    upq_hf.quantize_model(pair, small("ptq", rotation="hadamard", e2e_qp={"steps": distill.steps,
                                                                          "learning_rate": distill.scale_learning_rate}),
                          tokenizer=tokenizer, progress=False)
    a, b = no_int4.state_dict(), pair.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_upq_int2_target_dense_reconstructs_the_unquantized_blocks(tokenizer, monkeypatch):
    from upq_hf import recipes

    references = []
    real = recipes._ptq
    monkeypatch.setattr(recipes, "_ptq", lambda *a, **k: references.append((a[4], k.get("reference"))) or
                        real(*a, **k))
    results = {}
    for target in ("int4", "dense"):
        torch.manual_seed(0)
        model = model_for(tokenizer)
        upq_hf.quantize_model(model, small("upq", ptq={**INT4_STAGE, "int2_target": target}), tokenizer=tokenizer,
                              progress=False)
        results[target] = model.state_dict()
    (bits4, ref4), (bits2, ref2), (_, ref4b), (_, dense_ref) = references
    assert (bits4, bits2) == (4, 2) and ref4 is ref2 is ref4b is None
    assert dense_ref is not None and not any(isinstance(m, upq_hf.qat.QATLinear) for m in dense_ref.modules())
    differ = [k for k in results["int4"] if not torch.equal(results["int4"][k], results["dense"][k])]
    assert any(k.endswith("weight_scale") for k in differ)
    with pytest.raises(ValueError, match="int2_target must be one of"):
        small("upq", ptq={"int2_target": "fp"})
    with pytest.raises(ValueError, match="int4_epochs must be a non-negative"):
        small("upq", ptq={"int4_epochs": -1})


def test_int4_only_recipes_reject_bits_4(tokenizer):
    with pytest.raises(ValueError, match="produces INT2"):
        upq_hf.quantize_model(model_for(tokenizer), small("ntp", bits=4), tokenizer=tokenizer)


def test_gpu_only_option_without_gpu_is_a_clear_error(tokenizer):
    if torch.cuda.is_available():
        pytest.skip("about machines without a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        upq_hf.quantize_model(model_for(tokenizer), small("ptq"), tokenizer=tokenizer, device="cuda")


def test_unknown_dataset_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="unknown dataset"):
        upq_hf.quantize_model(model_for(tokenizer), small("ptq", data={"dataset": "no-such-dataset-xyz"}),
                              tokenizer=tokenizer)


def test_from_pretrained_upq_stays_marked_int2(tokenizer, tmp_path):
    """``from_pretrained(quantization_config=UPQConfig(recipe="upq"))``: the INT4 stage in the middle leaves no
    trace on the INT2 model's marks."""
    source = tmp_path / "dense"
    model_for(tokenizer).save_pretrained(source)
    tokenizer.save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=small("upq", ptq=INT4_STAGE))
    assert all(m.bits == 2 for m in upq_layers(model).values())
    assert model.config.quantization_config.bits == 2 and model.hf_quantizer.quantization_config.bits == 2
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
    monkeypatch.setitem(recipes.RECIPES, "gptq", recipes.Recipe("gptq", lambda model, config, run: model,
                                                                "second-order PTQ", ("rtn", "data"), trains=False))
    assert UPQConfig(recipe="gptq").recipe == "gptq"
    parser = cli.build_parser()
    quantize = next(a for a in parser._subparsers._group_actions[0].choices["quantize"]._actions
                    if a.dest == "recipe")
    assert quantize.choices == ["rtn", "ptq", "upq", "ntp", "distill", "gptq"]
    assert "gptq: second-order PTQ" in quantize.help
    card = model_card(UPQConfig(recipe="gptq").to_dict())
    assert "by the `gptq` recipe (second-order PTQ)." in card and "training budget" not in card
    assert "training budget" in model_card(UPQConfig(recipe="ntp").to_dict())


def test_recipe_writes_only_where_it_is_told(tokenizer, tmp_path, monkeypatch):
    """A recipe writes nothing of its own accord: the INT4 stage's state only under ``keep_int4``, trainer
    checkpoints only under ``work_dir`` (else a temporary folder, removed when training ends)."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    upq_hf.quantize_model(model_for(tokenizer), small("upq", ptq=INT4_STAGE), tokenizer=tokenizer, progress=False)
    assert list(work.iterdir()) == []
    assert list(scratch.iterdir()) == []  # no upq-train-* folder left behind (966 had piled up in /tmp)


def test_upq_restart_starts_int2_from_the_same_latent_weights(tokenizer, tmp_path):
    """A restart from the kept INT4 stage reads its latent weights and makes the same INT2 model, code for code
    and scale for scale, as the run that kept it."""
    int4_dir = str(tmp_path / "int4")
    config = small("upq", ptq=INT4_STAGE, distill={"steps": 1, "mixed_precision": "no"})
    straight = model_for(tokenizer)
    upq_hf.quantize_model(straight, config, tokenizer=tokenizer, keep_int4=int4_dir, progress=False)
    from safetensors import safe_open

    with safe_open(f"{int4_dir}/int4_stage.safetensors", "pt") as handle:
        kept = {key.rpartition(".")[0] for key in handle.keys() if key.endswith(".weight")}
        assert all(handle.get_tensor(key).dtype == torch.float32 for key in handle.keys())
    assert kept == set(upq_layers(straight))
    again = model_for(tokenizer)
    upq_hf.quantize_model(again, config, tokenizer=tokenizer, keep_int4=int4_dir, progress=False)
    first, second = upq_layers(straight), upq_layers(again)
    for name in first:
        assert torch.equal(first[name].weight, second[name].weight), name
        assert torch.equal(first[name].weight_scale, second[name].weight_scale), name


def test_upq_with_rotation_auto_rotates_and_says_so(tokenizer, tmp_path, capsys):
    """``upq`` with ``rotation="auto"`` turns a Llama's residual stream: the saved config and the model card say so,
    the head is untied, and the checkpoint reloads to the same logits."""
    config = small("upq", rotation="auto")
    assert config.rotation == "auto"
    model = model_for(tokenizer)
    upq_hf.quantize_model(model, config, tokenizer=tokenizer, progress=False)
    assert config.rotation == "hadamard" and model.config.tie_word_embeddings is False
    assert "[upq] rotated the residual stream (hadamard, seed 0)" in capsys.readouterr().err
    model.save_pretrained(tmp_path / "q")
    card = (tmp_path / "q" / "README.md").read_text()
    assert 'rotation: "hadamard"' in card and "turned by a hadamard rotation" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config.rotation == "hadamard"
    ids = torch.randint(0, len(tokenizer), (1, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("share, rates", [
    (0.05, [1.0, 0.75, 0.25]),  # the default: one warm-up step (0.05 x 4, at least one), then the cosine
    (0.5, [0.5, 1.0, 0.5]),  # two of four steps rising linearly, then the cosine
])
def test_distill_warmup_is_a_share_of_the_steps(tokenizer, share, rates):
    """``distill.warmup``: the learning rates rise over that share of the steps (at least one), then decay on a
    cosine; read from the optimizer at each step, relative to the peak scale rate."""
    from transformers import TrainerCallback

    seen = []

    class Rates(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seen.append(max(group["lr"] for group in optimizer.param_groups))

    torch.manual_seed(0)
    config = small("upq", rotation=None, distill={"steps": 4, "samples": 8, "warmup": share, "scale_learning_rate": 0.01,
                                                  "learning_rate": 0.01})
    upq_hf.quantize_model(model_for(tokenizer), config, tokenizer=tokenizer, progress=False, callbacks=[Rates()])
    assert [round(rate / 0.01, 6) for rate in seen] == [0.0, *rates]  # the first step at zero, as transformers has it


@pytest.mark.parametrize("rotation", ["hadamard", None])
def test_distill_trains_an_untied_head_at_its_own_rate(tokenizer, rotation):
    """``distill.head_learning_rate``: a rotated model's head (untied by the rotation) trains in its own group at
    that relative rate; a tied head (the input embeddings too) stays as it is, whatever the rate."""
    from transformers import TrainerCallback

    seen = {}

    class Start(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            if not seen:
                seen["head"] = model.get_output_embeddings().weight.detach().clone()
                seen["embeddings"] = model.get_input_embeddings().weight.detach().clone()

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seen.setdefault("groups", {g.get("name"): g["initial_lr"] for g in optimizer.param_groups})

    torch.manual_seed(0)
    model = model_for(tokenizer)
    config = small("upq", rotation=rotation, distill={"steps": 3, "samples": 8, "head_learning_rate": 0.05})
    upq_hf.quantize_model(model, config, tokenizer=tokenizer, progress=False, callbacks=[Start()])
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(embeddings, seen["embeddings"])
    if rotation:
        assert head is not embeddings and seen["groups"]["head"] == 0.05
        moved = (head - seen["head"]).abs().mean() / seen["head"].abs().mean()
        assert 0.01 < moved < 0.2, moved  # three updates at most 5% of the mean magnitude each
    else:
        assert head is embeddings and "head" not in seen["groups"]
        assert torch.equal(head, seen["head"])


def test_sampled_answers_reach_the_distillation_alone(tokenizer, monkeypatch, tmp_path):
    """``distill.sampled_answers``: the distillation's "self" data asks for that many sampled answers per prompt
    beside the greedy ones; the reconstruction's calibration text stays the greedy answers."""
    from upq_hf.data import sources

    calls = []
    real = sources.self_generated

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append((k.get("sampled", 0), len(out)))
        return out

    monkeypatch.setattr(sources, "self_generated", spy)
    monkeypatch.setenv("UPQ_CACHE", str(tmp_path))
    torch.manual_seed(0)
    config = small("upq", data={"dataset": "self", "prompts": 4}, distill={"sampled_answers": 1})
    upq_hf.quantize_model(model_for(tokenizer), config,
                          tokenizer=tokenizer, progress=False)
    assert calls == [(0, 4), (1, 8)]  # calibration: 4 greedy answers; distillation: 4 greedy + 4 sampled
    with pytest.raises(ValueError, match="sampled_answers must be a non-negative integer"):
        small("upq", distill={"sampled_answers": -1})
    with pytest.raises(ValueError, match="needs data.dataset 'self'"):
        small("upq", distill={"sampled_answers": 1})  # small()'s data is a list of texts
