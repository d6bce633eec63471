"""E2E-QP (EfficientQAT's last stage): codes fixed, scales trained. The layer, the trainable set, the config
and the ``upq`` recipe's stage."""

import pytest
import torch
from torch import nn

import upq_hf
from upq_hf import UPQConfig, formats
from upq_hf.convert import upq_layers
from upq_hf.distill import select_trainable
from upq_hf.models import load_tokenizer
from upq_hf.optim import StepAdam, quantized_param_groups
from upq_hf.qat import QATLinear

from helpers import tiny_llama
from test_recipes import TEXTS


def _layer(bits, seed=0, n=24, k=64, group_size=16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    layer = QATLinear.from_weight(w, torch.randn(n, generator=g) * 0.01, bits, group_size, scale_init="max")
    # latent weights off the grid, as after training
    layer.weight.data.add_(torch.randn(n, k, generator=g) * 0.01)
    return layer


@pytest.mark.parametrize("bits", [2, 4])
def test_freeze_codes_keeps_the_forward_and_the_packed_layer(bits):
    layer = _layer(bits)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    before = layer(x).detach()
    packed_before = layer.quantized_weight()
    layer.freeze_codes()
    assert layer.codes.dtype == torch.uint8 and torch.equal(layer.codes, packed_before.codes)
    assert not layer.weight.requires_grad and (layer.weight_zero is None or not layer.weight_zero.requires_grad)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)
    after = layer.quantized_weight()
    assert torch.equal(after.codes, packed_before.codes) and torch.equal(after.scale, packed_before.scale)
    if bits == 4:
        assert torch.equal(after.zero, packed_before.zero)


@pytest.mark.parametrize("bits", [2, 4])
def test_scale_gradient_is_the_level_times_the_weight_gradient(bits):
    """d loss / d s for a group = sum over its weights of (k - 1.5) (or k - z) * d loss / d w: hand-computed
    from the weight's gradient of a dense layer with the same (dequantized) weight."""
    layer = _layer(bits, seed=2)
    layer.freeze_codes()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    target = torch.randn(7, 24, generator=torch.Generator().manual_seed(4))
    ((layer(x) - target) ** 2).sum().backward()
    dense_w = layer.fake_quant_weight().detach().requires_grad_(True)
    ((nn.functional.linear(x, dense_w, layer.bias.detach()) - target) ** 2).sum().backward()
    levels = layer.codes.float() - (1.5 if bits == 2 else formats._expand(layer.weight_zero.detach(), 16, 64))
    expected = formats._grouped(levels * dense_w.grad, 16).sum(-1)
    torch.testing.assert_close(layer.weight_scale.grad, expected, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None


def test_training_the_scales_moves_them_and_no_code():
    layer = _layer(2, seed=5)
    layer.freeze_codes()
    codes = layer.codes.clone()
    scale0 = layer.weight_scale.detach().clone()
    layer.bias.requires_grad_(False)
    optimizer = StepAdam(quantized_param_groups([layer], lr=0.02, scale_lr=0.05))
    assert [g["name"] for g in optimizer.param_groups] == ["scales"]
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    target = torch.randn(16, 24, generator=torch.Generator().manual_seed(7)) * 0.1
    for _ in range(5):
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        optimizer.step()
    # relative steps of 5 % at most: every scale moved, none by more than 5 updates of 5 %
    ratio = layer.weight_scale.detach() / scale0
    assert (ratio != 1).all() and ((ratio - 1).abs() <= 1.05 ** 5 - 1 + 1e-6).all()
    frozen = layer.freeze(backend="torch")  # the reference path: the QAT layer's arithmetic, bit for bit
    assert torch.equal(frozen.codes(), codes)
    with torch.no_grad():
        assert torch.equal(frozen(x), layer(x))


def test_select_trainable_takes_only_the_scales_of_frozen_layers():
    frozen, free = _layer(2, seed=8), _layer(4, seed=9)
    frozen.freeze_codes()
    model = nn.Sequential(frozen, nn.LayerNorm(24), free)
    count = select_trainable(model, train_norms=True)
    n_scales = frozen.weight_scale.numel()
    n_free = free.weight.numel() + free.weight_scale.numel() + free.weight_zero.numel()
    assert count == n_scales + 2 * 24 + n_free
    assert not frozen.weight.requires_grad and frozen.weight_scale.requires_grad and free.weight.requires_grad


def test_config_checks_the_e2e_qp_options():
    assert UPQConfig(recipe="upq", e2e_qp={"steps": 3}).e2e_qp.steps == 3
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        UPQConfig(recipe="upq", e2e_qp={"steps": -1})
    with pytest.raises(ValueError, match="recipe 'distill' runs no 'e2e_qp' stage"):
        UPQConfig(recipe="distill", e2e_qp={"steps": 2})
    with pytest.raises(ValueError, match="train_codes is no longer a setting: upq's Distill-QAT keeps the"):
        UPQConfig(recipe="upq", train_codes=True)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        UPQConfig(recipe="upq", e2e_qp={"steps": 2, "learning_rate": 0})


@pytest.mark.parametrize("recipe", ["upq", "ptq"])
def test_e2e_qp_stage_moves_scales_and_keeps_codes(recipe):
    """The same run with and without the stage: PTQ and Distill-QAT are deterministic on the CPU, so the codes
    after them are the same; the stage then changes scales (and norms) and leaves every code as it was."""
    tokenizer = load_tokenizer(None)
    results = []
    for steps in (0, 3):
        torch.manual_seed(0)
        model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.1)
        config = UPQConfig(bits=2, group_size=32, int4_group_size=32, recipe=recipe,
                           data={"dataset": TEXTS, "calibration_samples": 4, "calibration_seqlen": 32},
                           ptq={"epochs": 1}, distill={"steps": 2, "batch_size": 2, "seqlen": 32, "samples": 4,
                                                       "mixed_precision": "no"},
                           e2e_qp={"steps": steps, "learning_rate": 0.05})
        upq_hf.quantize_model(model, config, tokenizer=tokenizer, progress=False)
        results.append(model)
    plain, tuned = (upq_layers(m) for m in results)
    assert plain.keys() == tuned.keys() and len(plain) == 14
    for name in plain:
        assert torch.equal(plain[name].codes(), tuned[name].codes()), name
    moved = sum(not torch.equal(plain[n].weight_scale, tuned[n].weight_scale) for n in plain)
    assert moved == len(plain)
    norms = [(a, b) for (na, a), (nb, b) in zip(results[0].named_parameters(), results[1].named_parameters())
             if "norm" in na]
    assert norms and any(not torch.equal(a, b) for a, b in norms)


def test_model_card_names_the_e2e_qp_stage_only_when_it_ran():
    from upq_hf.publish import model_card

    for recipe in ("upq", "ptq"):
        card = model_card(UPQConfig(recipe=recipe, e2e_qp={"steps": 15, "learning_rate": 0.003}).to_dict())
        assert "  e2e_qp_steps: 15" in card and "| E2E-QP (codes fixed, scales trained) | 15 steps at 0.003 |" in card
    assert "E2E-QP" not in model_card(UPQConfig(recipe="upq").to_dict())


def test_cli_passes_the_e2e_qp_options_through_a_config_file(monkeypatch, tmp_path):
    import json

    from upq_hf import cli

    seen = {}

    def stop(args, config, device):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_check_before_work", stop)
    path = tmp_path / "stages.json"
    path.write_text(json.dumps({"e2e_qp": {"steps": 7, "learning_rate": 0.004}}))
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--bits", "2", "--recipe", "upq", "--config", str(path), "--out", str(tmp_path / "out")])
    assert seen["config"].e2e_qp.steps == 7 and seen["config"].e2e_qp.learning_rate == 0.004


def test_upq_distill_qat_keeps_the_reconstruction_codes():
    """The codes at the start of Distill-QAT (the INT2 reconstruction's, read by a callback) are the packed
    model's codes: even a large weight learning rate moves no code (only the scales and norms train)."""
    from transformers import TrainerCallback

    from upq_hf.qat import qat_layers

    start = {}

    class Codes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            if not start:
                start.update({n: m.quantized_weight().codes.clone() for n, m in qat_layers(model).items()})

    tokenizer = load_tokenizer(None)
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.1)
    config = UPQConfig(bits=2, group_size=32, int4_group_size=32, recipe="upq",
                       data={"dataset": TEXTS, "calibration_samples": 4, "calibration_seqlen": 32}, ptq={"epochs": 1},
                       distill={"steps": 3, "batch_size": 2, "seqlen": 32, "samples": 4, "learning_rate": 0.5,
                                "mixed_precision": "no"})
    upq_hf.quantize_model(model, config, tokenizer=tokenizer, progress=False, callbacks=[Codes()])
    final = upq_layers(model)
    assert start.keys() == final.keys() and len(final) == 14
    assert all(torch.equal(start[n], final[n].codes()) for n in final)
