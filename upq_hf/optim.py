"""Adam measured in quantization steps: one learning rate that means the same thing in every layer.

The latent weights of a quantized layer only matter when they cross a rounding boundary, and the
distance to the next boundary is a fraction of the layer's quantization step ``s`` -- which differs
by an order of magnitude across layers and groups (and is 16x larger at INT2 than at INT4). Plain
Adam moves every element by about ``lr`` per update whatever its ``s``, so a learning rate that
flips codes in one layer does nothing in another, and a scale learning rate that is gentle on a large
scale wrecks a small one (and, below the scale dtype's resolution, is rounded away entirely).

:class:`StepAdam` multiplies each element's Adam update by a *unit*:

* latent weights: their group's current quantization step, so ``lr`` is "fraction of a step per
  update" (``lr=0.02``: about 25 updates in one direction to cross half a step);
* scales: the scale itself, so ``lr`` is "relative change per update" (``1e-3``: 0.1 %);
* normalisation weights (:func:`relative_param_group`): their tensor's mean magnitude, so ``lr`` is
  again a relative change per update. Their sizes differ by two orders of magnitude within one model
  (SmolLM2-135M: mean |w| 0.027 in the first block's input norm, 1.8 in the final norm), so any
  absolute learning rate either wrecks the small ones or leaves the large ones where they are;
* no unit (INT4 zero points, anything else): plain Adam.

Block-wise PTQ (:mod:`upq_hf.ptq`) and Distill-QAT (:mod:`upq_hf.distill`) both use it.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class StepAdam(torch.optim.Optimizer):
    """Adam whose update of each element is scaled by a unit: ``p -= lr * unit * m_hat / (sqrt(v_hat) + eps)``.

    Each param group may carry ``units``: a list parallel to ``params`` of ``None`` (plain Adam), a
    tensor of the parameter's shape, or a ``(N, G)`` tensor for an ``(N, K)`` parameter (one unit per
    group of ``K / G`` consecutive columns, broadcast on the fly). Units are read at every step, so a
    unit may be a live tensor (e.g. the layer's scale ``Parameter``, which itself trains).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        # The units live outside the param groups: optimizer.state_dict() then holds no tensors of the model
        # (accelerate deep-copies it, checkpoints save it), and a restored optimizer keeps its live units.
        # A unit that is no parameter of the model (measured once, e.g. relative_param_group's) goes into
        # the parameter's state instead: a checkpoint saves it and resuming restores it, where measuring it
        # again from the resumed weights would change every later update.
        groups = list(params)
        self._units: dict[int, torch.Tensor] = {}
        fixed: list[tuple[torch.Tensor, torch.Tensor]] = []
        if groups and isinstance(groups[0], dict):
            clean = []
            for group in groups:
                group = dict(group)
                units = group.pop("units", None)
                if units is not None:
                    if len(units) != len(group["params"]):
                        raise ValueError("units must be a list parallel to the group's params")
                    for param, unit in zip(group["params"], units):
                        if isinstance(unit, nn.Parameter):
                            self._units[id(param)] = unit
                        elif unit is not None:
                            fixed.append((param, unit))
                clean.append(group)
            groups = clean
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps})
        for param, unit in fixed:
            self.state[param]["unit"] = unit

    def unit_of(self, param: torch.Tensor) -> torch.Tensor | None:
        unit = self._units.get(id(param))
        return self.state[param].get("unit") if unit is None and param in self.state else unit

    @staticmethod
    def _apply_unit(update: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        unit = unit.detach()
        if unit.shape == update.shape:
            return update.mul_(unit)
        if update.dim() == 2 and unit.dim() == 2 and unit.shape[0] == update.shape[0] \
                and update.shape[1] % unit.shape[1] == 0:
            n, k = update.shape
            return update.view(n, unit.shape[1], k // unit.shape[1]).mul_(unit.unsqueeze(-1).to(update.dtype)) \
                .view(n, k)
        raise ValueError(f"unit of shape {tuple(unit.shape)} does not fit a parameter of shape {tuple(update.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                unit = self._units.get(id(param), state.get("unit"))
                if "step" not in state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(param)
                    state["v"] = torch.zeros_like(param)
                state["step"] += 1
                m, v, t = state["m"], state["v"], state["step"]
                m.lerp_(param.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                # one temporary per parameter (weight-sized allocations cost more than the arithmetic on a CPU)
                update = torch.div(v, 1 - beta2 ** t).sqrt_().add_(group["eps"])
                torch.div(m, update, out=update)
                if unit is not None:
                    update = self._apply_unit(update, unit)
                param.add_(update, alpha=-group["lr"] / (1 - beta1 ** t))
        return loss


def quantized_param_groups(modules: Iterable[nn.Module], lr: float, scale_lr: float, *,
                           live_units: bool = True) -> list[dict]:
    """Param groups of :class:`StepAdam` for ``QATLinear``-like modules (``weight``, ``weight_scale``,
    optional ``weight_zero``): weights in units of their group's step, scales relative to themselves,
    INT4 zero points plain (in codes).

    ``live_units=True`` reads the units from the current scales at each step; ``False`` freezes them at
    their present values (block-wise PTQ: each block's short run measures steps against its start).
    Only parameters with ``requires_grad`` are included.
    """
    weights, weight_units, scales, scale_units, zeros = [], [], [], [], []
    for module in modules:
        scale = module.weight_scale
        unit = scale if live_units else scale.detach().clone()
        if scale.requires_grad:
            scales.append(scale)
            scale_units.append(unit)
        if module.weight is not None and module.weight.requires_grad:  # None: codes packed, no latent weight
            weights.append(module.weight)
            weight_units.append(unit)
        zero = getattr(module, "weight_zero", None)
        if zero is not None and zero.requires_grad:
            zeros.append(zero)
    groups = []
    if scales:
        groups.append({"params": scales, "lr": scale_lr, "units": scale_units, "name": "scales"})
    if zeros:
        groups.append({"params": zeros, "lr": scale_lr, "name": "zeros"})
    if weights:
        groups.append({"params": weights, "lr": lr, "units": weight_units, "name": "weights"})
    return groups


def relative_param_group(params: Iterable[torch.Tensor], lr: float, name: str) -> dict:
    """A :class:`StepAdam` group whose updates are relative to each tensor's mean magnitude, measured
    now: ``lr=1e-2`` moves every element by about 1 % of its tensor's mean ``|w|`` per update (the
    same rate for an element that happens to be near zero as for its neighbours)."""
    params = list(params)
    units = [p.detach().abs().mean().clamp_min(torch.finfo(torch.float32).tiny).expand_as(p) for p in params]
    return {"params": params, "lr": lr, "units": units, "name": name}
