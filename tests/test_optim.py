"""StepAdam: Adam whose updates are measured in quantization steps (weights) or relative to the scale."""

import pytest
import torch

from upq_hf.optim import StepAdam, quantized_param_groups
from upq_hf.qat import QATLinear


def test_without_units_it_is_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 8))
    b = torch.nn.Parameter(a.detach().clone())
    ours = StepAdam([{"params": [a], "lr": 1e-2}], eps=1e-8)
    ref = torch.optim.Adam([b], lr=1e-2, eps=1e-8)
    for step in range(5):
        grad = torch.randn(6, 8, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_group_units_scale_the_first_step_by_hand():
    """Step 1 of Adam moves every element by lr * sign(grad); with (N, G) units each group of K/G columns
    moves by lr * its unit."""
    p = torch.nn.Parameter(torch.zeros(2, 8))
    unit = torch.tensor([[1.0, 2.0], [0.5, 4.0]])  # two groups of 4 columns per row
    opt = StepAdam([{"params": [p], "lr": 0.1, "units": [unit]}])
    p.grad = torch.tensor([[1.0, -2, 3, -4, 5, -6, 7, -8], [-1.0, 1, -1, 1, 1e-3, -1e-3, 1e-3, -1e-3]])
    opt.step()
    expected = -0.1 * torch.sign(p.grad) * unit.repeat_interleave(4, dim=1)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-9)


def test_live_units_are_read_at_each_step():
    p = torch.nn.Parameter(torch.zeros(1, 4))
    unit = torch.ones(1, 1)
    opt = StepAdam([{"params": [p], "lr": 1.0, "units": [unit]}])
    p.grad = torch.ones(1, 4)
    opt.step()
    unit.fill_(3.0)  # e.g. the layer's scale has grown
    p.grad = torch.ones(1, 4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((1, 4), -4.0))


def test_a_unit_that_does_not_fit_is_refused():
    p = torch.nn.Parameter(torch.zeros(2, 6))
    opt = StepAdam([{"params": [p], "lr": 0.1, "units": [torch.ones(2, 4)]}])
    p.grad = torch.ones(2, 6)
    with pytest.raises(ValueError, match="does not fit"):
        opt.step()


def test_quantized_param_groups_of_int2_and_int4_layers():
    torch.manual_seed(0)
    int2 = QATLinear.from_weight(torch.randn(8, 16), None, 2, 8)
    int4 = QATLinear.from_weight(torch.randn(8, 16), None, 4, 8)
    groups = {g["name"]: g for g in quantized_param_groups([int2, int4], lr=0.05, scale_lr=1e-3)}
    assert set(groups) == {"weights", "scales", "zeros"}
    assert groups["weights"]["lr"] == 0.05 and groups["scales"]["lr"] == 1e-3
    assert groups["weights"]["units"][0] is int2.weight_scale  # live: the weights' unit is the current scale
    assert groups["scales"]["units"][1] is int4.weight_scale  # scales move relative to themselves
    assert groups["zeros"]["params"] == [int4.weight_zero] and "units" not in groups["zeros"]
    # a relative scale step: after one update every scale has moved by exactly lr of itself
    before = int2.weight_scale.detach().clone()
    int2.weight.requires_grad_(False)  # a frozen weight is left out of the groups
    opt = StepAdam(quantized_param_groups([int2], lr=0.0, scale_lr=1e-2))
    assert [g["name"] for g in opt.param_groups] == ["scales"]
    int2.weight_scale.grad = torch.ones_like(before)
    opt.step()
    torch.testing.assert_close(int2.weight_scale.detach(), before * (1 - 1e-2), rtol=1e-6, atol=0)


def test_state_dict_holds_no_model_tensors_and_a_restored_optimizer_keeps_live_units():
    """accelerate deep-copies the optimizer's state dict and the Trainer saves it: the units must not be in
    it, and an optimizer that loads it must still read the live scale."""
    import copy

    torch.manual_seed(0)
    layer = QATLinear.from_weight(torch.randn(8, 16), None, 2, 8)
    layer.weight.grad = torch.ones_like(layer.weight)
    layer.weight_scale.grad = torch.zeros_like(layer.weight_scale)
    opt = StepAdam(quantized_param_groups([layer], lr=0.1, scale_lr=0.0))
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # raised with tensors in the param groups
    assert all(not isinstance(v, torch.Tensor) for g in state["param_groups"] for v in g.values())
    fresh = StepAdam(quantized_param_groups([layer], lr=0.1, scale_lr=0.0))
    fresh.load_state_dict(state)
    assert fresh.unit_of(layer.weight) is layer.weight_scale
    with torch.no_grad():
        layer.weight_scale.mul_(2)  # the scale has grown: the next weight step is twice as long
    before = layer.weight.detach().clone()
    fresh.step()
    step = (before - layer.weight.detach()).abs().reshape(8, 2, 8)
    expected = 0.1 * layer.weight_scale.detach().unsqueeze(-1).expand_as(step)
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-7)
