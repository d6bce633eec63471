"""Block-wise PTQ on a tiny random Llama: capture, per-block reconstruction, packing, fidelity vs RTN."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from upq_hf.convert import quantize_linears_rtn
from upq_hf.head import UPQHead
from upq_hf.nn import UPQLinear
from upq_hf.ptq import PTQReport, _run_block, blockwise_ptq, capture_block_inputs, find_decoder_layers
from upq_hf.stages import PTQConfig


def P(**fields) -> PTQConfig:
    """The tests' PTQ settings: batches of 4, no hold-out (each block keeps its start only if training raised its
    error), then ``fields``."""
    return PTQConfig(**{"holdout": 0.0, "batch_size": 4, **fields})

pytestmark = pytest.mark.usefixtures("one_thread")


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randint(0, 128, (16, 32), generator=generator)
    held_out = torch.randint(0, 128, (8, 32), generator=generator)
    with torch.no_grad():
        reference = model(held_out).logits
    return model, calibration, held_out, reference


def _logits_error(model, held_out, reference):
    with torch.no_grad():
        return nn.functional.mse_loss(model(held_out).logits, reference).item()


def test_captured_inputs_replay_the_model(tiny):
    model, calibration, _, _ = tiny
    name, layers = find_decoder_layers(model)
    assert name == "model.layers" and layers is model.model.layers
    hidden, kwargs = capture_block_inputs(model, layers, calibration[:4], torch.device("cpu"))
    assert hidden.shape == (4, 32, 64)
    assert "position_embeddings" in kwargs
    with torch.no_grad():
        torch.testing.assert_close(hidden, model.model.embed_tokens(calibration[:4]))
        for block in layers:  # the blocks fed the captured inputs and kwargs give the model's logits
            hidden = _run_block(block, hidden, kwargs)
        logits = model.lm_head(model.model.norm(hidden))
        torch.testing.assert_close(logits, model(calibration[:4]).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(4, 16), (2, None), (2, 16)])
def test_blockap_beats_rtn(tiny, bits, group_size):
    model, calibration, held_out, reference = tiny
    rtn = copy.deepcopy(model)
    quantize_linears_rtn(rtn, bits, group_size, scale_init="mse")
    ptq = copy.deepcopy(model)
    report = blockwise_ptq(ptq, calibration, bits, group_size, P(epochs=4), progress=False)

    assert isinstance(report, PTQReport) and len(report.blocks) == 2 and report.steps_per_block == 16
    for block in report.blocks:  # every block reconstructs its unquantized output better than RTN
        assert not block.reverted
        assert block.final_loss < 0.9 * block.rtn_loss
    for index in range(2):
        for name in LINEARS:
            layer = ptq.get_submodule(f"model.layers.{index}").get_submodule(
                ("self_attn." if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + name)
            assert isinstance(layer, UPQLinear) and layer.bits == bits and layer.group_size == group_size
    assert type(ptq.lm_head) in (nn.Linear, UPQHead)  # dense
    assert torch.equal(ptq.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert len(report.layers) == 14
    assert _logits_error(ptq, held_out, reference) < _logits_error(rtn, held_out, reference)


def test_without_learning_ptq_is_rtn(tiny):
    """With zero learning rates nothing improves: every block keeps its RTN start, and the model equals
    round-to-nearest exactly (layers left out stay dense)."""
    model, calibration, held_out, _ = tiny
    skip = ["down_proj"]
    rtn = copy.deepcopy(model)
    quantize_linears_rtn(rtn, 2, 16, scale_init="mse", modules_to_not_convert=skip)
    ptq = copy.deepcopy(model)
    # the packed layers on the reference path, whose arithmetic is the QAT layers' (a CPU kernel sums in another
    # order: its final error then differs from the start's in the last bits, and the block still reverts)
    report = blockwise_ptq(ptq, calibration, 2, 16, P(steps=2, learning_rate=0.0, scale_learning_rate=0.0),
                           modules_to_not_convert=skip, progress=False, backend="torch")
    assert all(b.reverted and b.final_loss == b.rtn_loss for b in report.blocks)
    assert type(ptq.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(ptq.model.layers[0].mlp.up_proj, UPQLinear)
    with torch.no_grad():
        torch.testing.assert_close(ptq(held_out).logits, rtn(held_out).logits, rtol=0, atol=1e-6)
    assert "| block |" in report.table() and "reverted" in report.table()
    assert "INT2 g16" in str(report)


def test_rejects_bad_arguments(tiny):
    model, calibration, _, _ = tiny
    with pytest.raises(ValueError, match="group_size=24"):
        blockwise_ptq(model, calibration, 4, 24)
    with pytest.raises(ValueError, match="nsamples, seqlen"):
        blockwise_ptq(model, calibration[0], 4, 16)
    assert all(type(m) is not UPQLinear for m in model.modules())


def test_keep_qat_leaves_trained_layers_that_freeze_to_the_packed_result(tiny, monkeypatch):
    """keep_qat=True (UPQ's INT2 stage) ends with QATLinear layers whose frozen form is bit-identical to
    what keep_qat=False packs, and whose forward pass already equals the packed model's."""
    from upq_hf.qat import QATLinear, freeze_model

    monkeypatch.setenv("UPQ_BACKEND", "torch")  # the reference path is exact; the CPU kernel rounds x to bf16
    model, calibration, held_out, _ = tiny
    packed, kept = copy.deepcopy(model), copy.deepcopy(model)
    blockwise_ptq(packed, calibration, 2, 32, P(steps=4), progress=False)
    blockwise_ptq(kept, calibration, 2, 32, P(steps=4), keep_qat=True, progress=False)
    qat = {n: m for n, m in kept.named_modules() if isinstance(m, QATLinear)}
    assert len(qat) == 2 * len(LINEARS)
    assert all(m.weight.dtype == torch.float32 and not m.weight.requires_grad for m in qat.values())
    with torch.no_grad():
        torch.testing.assert_close(kept(held_out).logits, packed(held_out).logits, rtol=0, atol=0)
    freeze_model(kept)
    for name, module in packed.named_modules():
        if isinstance(module, UPQLinear):
            frozen = kept.get_submodule(name)
            assert torch.equal(frozen.weight, module.weight) and torch.equal(frozen.weight_scale, module.weight_scale)


def test_reference_model_gives_the_targets(tiny):
    """reference= (UPQ's INT2 stage: start from INT4 weights, reconstruct the unquantized blocks): with the
    model itself as reference the result is unchanged; with another start, block 0's RTN loss is measured
    against the reference block's output, which we compute by hand."""
    from upq_hf.convert import dequantize_layers
    from upq_hf.formats import quantize, dequantize

    model, calibration, held_out, _ = tiny
    plain, same = copy.deepcopy(model), copy.deepcopy(model)
    blockwise_ptq(plain, calibration, 2, 32, P(steps=2), progress=False)
    blockwise_ptq(same, calibration, 2, 32, P(steps=2), reference=copy.deepcopy(model), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(same(held_out).logits, plain(held_out).logits, rtol=0, atol=0)

    start = copy.deepcopy(model)
    quantize_linears_rtn(start, 4, 32)
    dequantize_layers(start)
    int4_block0 = copy.deepcopy(start.model.layers[0])
    report = blockwise_ptq(start, calibration, 2, 32, P(steps=2), reference=model, progress=False)
    name, layers = find_decoder_layers(model)
    hidden, kwargs = capture_block_inputs(model, layers, calibration, torch.device("cpu"))
    with torch.no_grad():
        target = _run_block(model.model.layers[0], hidden, kwargs)
        for lname in LINEARS:  # RTN INT2 of the INT4 start, as PTQ's starting point
            parent = int4_block0.get_submodule(("self_attn." if lname.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                                                else "mlp.") + lname)
            parent.weight.copy_(dequantize(quantize(parent.weight, 2, 32, "mse"), torch.float32))
        rtn = _run_block(int4_block0, hidden, kwargs)
    token_error = ((rtn - target).pow(2) / target.pow(2).mean(-1, keepdim=True)).mean()
    assert report.blocks[0].rtn_loss == pytest.approx(token_error.item(), rel=1e-4)
    shallow = copy.deepcopy(model)
    shallow.model.layers = shallow.model.layers[:1]
    with pytest.raises(ValueError, match="decoder blocks"):
        blockwise_ptq(copy.deepcopy(model), calibration, 2, 32, P(steps=1), reference=shallow, progress=False)


# ------------------------------------------------------------------------------------------------ losses, hold-out

def test_reconstruction_loss_matches_hand_computed_values():
    from upq_hf.ptq import reconstruction_loss

    target = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # two tokens: mean squares 12.5 and 0.5
    y = torch.tensor([[[4.0, 4.0], [0.0, 0.0]]])  # errors: (1, 0) and (0, 1)
    # each token's squared error over its target's mean square: (1 / 12.5 + 0 + 0 + 1 / 0.5) / 4
    assert reconstruction_loss(y, target).item() == pytest.approx((0.08 + 2.0) / 4)


def test_the_loss_ignores_the_size_of_massive_activations():
    from upq_hf.ptq import reconstruction_loss

    target = torch.randn(1, 4, 8)
    y = target + 0.1 * torch.randn(1, 4, 8)
    big_target, big_y = target.clone(), y.clone()
    big_target[0, 0] *= 1000  # one token with massive activations, its error scaled alike
    big_y[0, 0] = big_target[0, 0] + 1000 * (y[0, 0] - target[0, 0])
    assert reconstruction_loss(big_y, big_target).item() == pytest.approx(reconstruction_loss(y, target).item(),
                                                                           rel=1e-4)


def test_holdout_keeps_each_block_at_its_best_held_out_state(tiny, monkeypatch):
    """With a hold-out, a block ends in the state of its lowest held-out loss: training that only gets worse
    (a learning rate far too high) leaves every block at its round-to-nearest start, exactly."""
    model, calibration, held_out, reference = tiny
    rtn = copy.deepcopy(model)
    quantize_linears_rtn(rtn, 2, 16, scale_init="mse")
    wrecked = copy.deepcopy(model)
    report = blockwise_ptq(wrecked, calibration, 2, 16, P(steps=6, learning_rate=50.0, scale_learning_rate=5.0,
                                                          holdout=0.25, checks=3), progress=False)
    assert all(b.reverted for b in report.blocks)
    for name, layer in rtn.named_modules():
        if isinstance(layer, UPQLinear):
            other = wrecked.get_submodule(name)
            assert torch.equal(layer.weight, other.weight) and torch.equal(layer.weight_scale, other.weight_scale)
    good = copy.deepcopy(model)
    report = blockwise_ptq(good, calibration, 2, 16, P(epochs=4, holdout=0.25), progress=False)
    assert not any(b.reverted for b in report.blocks)
    assert _logits_error(good, held_out, reference) < _logits_error(rtn, held_out, reference)


def test_holdout_must_leave_data_to_train_on():
    with pytest.raises(ValueError, match=r"holdout is the share of calibration sequences held out, in \[0, 1\)"):
        P(holdout=1.0)


def test_autocast_bf16_trains_and_packs(tiny):
    model, calibration, held_out, reference = tiny
    rtn = copy.deepcopy(model)
    quantize_linears_rtn(rtn, 2, 16, scale_init="mse")
    ptq = copy.deepcopy(model)
    blockwise_ptq(ptq, calibration, 2, 16, P(epochs=4), autocast=torch.bfloat16, progress=False)
    assert all(isinstance(ptq.get_submodule(f"model.layers.0.self_attn.{p}"), UPQLinear) for p in ("q_proj", "k_proj"))
    assert next(ptq.parameters()).dtype == torch.float32  # autocast changes the compute, not the model
    assert _logits_error(ptq, held_out, reference) < _logits_error(rtn, held_out, reference)
