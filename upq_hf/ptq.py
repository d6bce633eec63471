"""Block-wise post-training quantization: the FP -> INT4 stage of UPQ (and a start for INT2).

One decoder block after the other, the block's linear layers are made trainable fake-quant layers
and their quantization parameters are learned to reconstruct the unquantized model's output of
that block (mean squared error) from the inputs the *already quantized* blocks before it produce;
then the block is frozen into packed ``UPQLinear`` layers and its quantized output becomes the next
block's input.

Data path: the calibration ``input_ids`` run through the model up to the first decoder block, whose
inputs are captured (with the keyword arguments the model passes its blocks: attention mask,
position embeddings, position ids, ...). Two activation sets of shape ``(nsamples, seqlen, hidden)``
then walk down the stack: the unquantized model's (``fp``: each block's output on it is the target)
and the quantized model's (``quant``: the input to the block being trained). Only the block being
quantized and one mini-batch sit on the accelerator (``device``); the activation sets stay on the
CPU unless ``activations_on_device=True``, so a model larger than the accelerator still quantizes.
Training runs in float32 whatever the model's dtype.

Algorithms (``algorithm=``):

* ``"lwc"``: learnable weight clipping (OmniQuant). Weights stay fixed; per group, the clipping
  range is learned as a sigmoid fraction of the weight range (``[sigmoid(b) min w, sigmoid(g) max w]``
  for INT4, ``sigmoid(g) max|w|`` for SEQ INT2), and the scale and zero point follow from it.
  Initialised from ``scale_init`` (the RTN scales). Few parameters, cannot change which way an
  individual weight rounds except through the range.
* ``"blockap"``: block-wise training of all parameters (EfficientQAT's Block-AP): the latent
  weights, scales and INT4 zero points of every linear layer of the block train together with
  straight-through gradients (:class:`upq_hf.qat.QATLinear`). Weights move, so individual roundings
  flip: it subsumes learnable rounding and learnable clipping.

Default: ``"blockap"``, chosen by measurement on the bundled SmolLM2-135M-Instruct (INT4 g64 and
INT2 SEQ per-row / g64, held-out prompts, ``examples/bench_ptq.py``; numbers in the ``PTQ`` section of
the project's results): with the same calibration data and the same number of steps it lowers the
blocks' reconstruction error and the KL to the unquantized model more than ``"lwc"`` does, at
almost the same cost per step (the block's forward and backward passes dominate both). The
defaults (32 x 128 tokens of calibration, 2 epochs, batch 4: 16 steps per block) quantize the
bundled model in about two minutes on a 2-core CPU (learning rates: :data:`DEFAULTS`).

Every block keeps its RTN start if training ends with a higher reconstruction loss than it began
with (reported as ``reverted``), so PTQ is never worse than RTN on the calibration data, block by
block. Linear layers selected for quantization that live outside the decoder blocks (rare; the
output embedding is never selected) are quantized by RTN.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .adapters import find_decoder_layers  # noqa: F401 - part of this module's API too
from .convert import _canonical, check_layers, linear_layers, replace_module
from .nn import UPQLinear
from .optim import StepAdam, quantized_param_groups
from .qat import QATLinear, init_quant_params, stored_scale

ALGORITHMS = ("blockap", "lwc")
DEFAULT_ALGORITHM = "blockap"

#: default hyper-parameters per algorithm: learning rate of the latent weights (``lr``, Block-AP only)
#: and of the quantization parameters (``scale_lr``: scales and zero points, or clipping logits).
DEFAULTS = {
    "blockap": {"lr": 0.01, "scale_lr": 3e-3},
    "lwc": {"lr": 0.0, "scale_lr": 0.1},
}
DEFAULT_EPOCHS = 2
DEFAULT_BATCH_SIZE = 4


# ----------------------------------------------------------------------------------------------
# Learnable weight clipping (OmniQuant LWC)
# ----------------------------------------------------------------------------------------------

def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(0.01, 0.9999)
    return torch.log(p) - torch.log1p(-p)


class LWCLinear(nn.Module):
    """Fixed weight, learnable clipping range per group (OmniQuant's LWC) in the UPQ formats.

    INT4: ``hi = sigmoid(clip_upper) * max(w)``, ``lo = sigmoid(clip_lower) * min(w)`` per group,
    ``scale = (hi - lo) / 15``, ``zero = round(-lo / scale)``. SEQ INT2: ``Delta = sigmoid(clip_upper) *
    max|w|``, ``scale = Delta / 2``. The scale is rounded to its storage dtype (straight-through) as
    in :class:`QATLinear`, so :meth:`to_qat` and then ``freeze`` reproduce this forward pass exactly.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None, scale_init: str = "mse",
                 scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        formats.check_group_size(linear.in_features, group_size)
        self.bits = bits
        self.group_size = formats.effective_group_size(linear.in_features, group_size)
        self.scale_dtype = scale_dtype
        w = linear.weight.detach().float()
        self.register_buffer("weight", w.clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        wg = formats._grouped(w, self.group_size)
        scale, _ = init_quant_params(w, bits, self.group_size, scale_init, scale_dtype)
        with torch.no_grad():
            if bits == 2:
                self.register_buffer("w_max", wg.abs().amax(-1))
                self.register_buffer("w_min", None)
                alpha = 2 * scale / self.w_max.clamp_min(1e-12)
                self.clip_upper = nn.Parameter(_logit(alpha))
                self.clip_lower = None
            else:
                self.register_buffer("w_max", wg.amax(-1).clamp_min(0))
                self.register_buffer("w_min", wg.amin(-1).clamp_max(0))
                alpha = scale * formats.INT4_MAX / (self.w_max - self.w_min).clamp_min(1e-12)
                self.clip_upper = nn.Parameter(_logit(alpha))
                self.clip_lower = nn.Parameter(_logit(alpha))

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.bits == 2:
            return stored_scale(torch.sigmoid(self.clip_upper) * self.w_max / 2, self.scale_dtype), None
        hi = torch.sigmoid(self.clip_upper) * self.w_max
        lo = torch.sigmoid(self.clip_lower) * self.w_min
        scale = stored_scale(((hi - lo) / formats.INT4_MAX), self.scale_dtype)
        return scale, -lo / scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.scale_zero()
        if self.bits == 2:
            weight = formats.fake_quant_seq(self.weight, scale, self.group_size)
        else:
            weight = formats.fake_quant_int4(self.weight, scale, zero, self.group_size)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    @torch.no_grad()
    def to_qat(self) -> QATLinear:
        scale, zero = self.scale_zero()
        zero = None if zero is None else torch.round(zero)
        return QATLinear(self.weight, scale, zero, self.bias, self.bits, self.group_size, self.scale_dtype)


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------

@dataclass
class BlockStats:
    """Reconstruction loss (MSE against the unquantized block output, over the calibration set) of one
    block at its RTN start and after training; ``reverted`` when training did not improve on RTN."""

    index: int
    name: str
    rtn_loss: float
    final_loss: float
    seconds: float
    reverted: bool = False


@dataclass
class PTQReport:
    algorithm: str
    bits: int
    group_size: int | None
    nsamples: int
    seqlen: int
    steps_per_block: int
    capture_seconds: float = 0.0
    seconds: float = 0.0
    blocks: list[BlockStats] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    formats: dict[tuple[int, int | None], int] = field(default_factory=dict)  # layers per (bits, group_size)

    @property
    def rtn_loss(self) -> list[float]:
        return [b.rtn_loss for b in self.blocks]

    @property
    def final_loss(self) -> list[float]:
        return [b.final_loss for b in self.blocks]

    def table(self) -> str:
        """Markdown table of the per-block losses."""
        lines = ["| block | RTN loss | PTQ loss | ratio | s |", "|---|---|---|---|---|"]
        for b in self.blocks:
            ratio = b.final_loss / b.rtn_loss if b.rtn_loss > 0 else float("nan")
            mark = " (reverted)" if b.reverted else ""
            lines.append(f"| {b.index} | {b.rtn_loss:.4g} | {b.final_loss:.4g}{mark} | {ratio:.3f} | {b.seconds:.1f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        def name(bits, group_size):
            return f"INT{bits} " + ("per-row" if group_size is None else f"g{group_size}")

        formats = self.formats or {(self.bits, self.group_size): len(self.layers)}
        ordered = sorted(formats.items(), key=lambda item: (item[0][0], item[0][1] or 0))
        fmt = name(*ordered[0][0]) if len(ordered) == 1 else ", ".join(
            f"{count} layers {name(*key)}" for key, count in ordered)
        return (f"PTQ {self.algorithm} {fmt}: {len(self.blocks)} blocks, "
                f"{self.nsamples}x{self.seqlen} tokens, {self.steps_per_block} steps/block, "
                f"{self.seconds:.1f} s (capture {self.capture_seconds:.1f} s)")


# ----------------------------------------------------------------------------------------------
# Finding and feeding the decoder blocks
# ----------------------------------------------------------------------------------------------

class _InputsCaptured(Exception):
    pass


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


_DROPPED_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                         device: torch.device, storage_device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict]:
    """Run ``input_ids`` (``(nsamples, seqlen)``) through ``model`` up to its first decoder block.

    Returns the block inputs ``(nsamples, seqlen, hidden)`` on ``storage_device`` and the keyword
    arguments the model passed the block (of the first sample; every sample has the same length and
    no padding, so they are shared: batch dimensions are 1 and broadcast), on ``device``. Everything
    but the decoder blocks is moved to ``device`` for the call and moved back after.
    """
    block_params = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    moved: list[tuple[torch.Tensor, torch.device]] = []
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in block_params and tensor.device != torch.device(device):
            moved.append((tensor, tensor.device))
            tensor.data = tensor.data.to(device)
    hidden: list[torch.Tensor] = []
    shared: dict = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        states = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(states.detach().to(storage_device))
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS and k != "hidden_states"})
            shared["_extra_args"] = tuple(args[1:])
        raise _InputsCaptured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in input_ids:
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _InputsCaptured:
                pass
    finally:
        handle.remove()
        for tensor, original in moved:
            tensor.data = tensor.data.to(original)
    if len(hidden) != len(input_ids):
        raise RuntimeError("the first decoder block was not reached for every calibration sample")
    if "use_cache" in shared:
        shared["use_cache"] = False
    return torch.cat(hidden), _to(shared, device)


#: block keyword arguments whose first dimension folds the batch into another (Bloom's ALiBi bias,
#: ``(batch * heads, 1, seq)``): captured for one sample, repeated for a batch of several
_BATCH_FOLDED_KWARGS = ("alibi",)


def _run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    extra = kwargs.get("_extra_args", ())
    kwargs = {k: v for k, v in kwargs.items() if k != "_extra_args"}
    for key in _BATCH_FOLDED_KWARGS:
        if len(x) > 1 and torch.is_tensor(kwargs.get(key)):
            kwargs[key] = kwargs[key].repeat(len(x), *[1] * (kwargs[key].dim() - 1))
    out = block(x, *extra, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _block_outputs(block, inputs, kwargs, device, batch_size, out=None, targets=None, loss: str = "mse",
                   channel_weights: torch.Tensor | None = None) -> float:
    """Block outputs for every sample, written into ``out`` (may be ``inputs``: rows are independent);
    returns the reconstruction loss (:func:`reconstruction_loss`) against ``targets`` when given."""
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size].to(device, torch.float32)
        y = _run_block(block, x, kwargs)
        if targets is not None:
            t = targets[start:start + batch_size].to(device, torch.float32)
            total += float(reconstruction_loss(y, t, loss, channel_weights)) * len(x)
        if out is not None:
            out[start:start + batch_size] = y.to(out.device, out.dtype)
    return total / max(1, len(inputs)) if targets is not None else float("nan")


LOSSES = ("mse", "token", "channel")


def _loss_weights(targets: torch.Tensor, loss: str, batch_size: int) -> torch.Tensor | None:
    """Per-channel weights of the ``"channel"`` loss: the inverse mean square of each hidden channel of the
    targets over the calibration set, normalised to mean 1 (so its values compare with plain MSE)."""
    if loss != "channel":
        return None
    total = torch.zeros(targets.shape[-1], dtype=torch.float64)
    for start in range(0, len(targets), batch_size):
        total += targets[start:start + batch_size].double().pow(2).sum(dim=(0, 1)).cpu()
    mean_square = (total / (targets.shape[0] * targets.shape[1])).float()
    weights = 1.0 / mean_square.clamp_min(mean_square.mean() * 1e-6)
    return weights / weights.mean()


def reconstruction_loss(y: torch.Tensor, target: torch.Tensor, loss: str = "mse",
                        channel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Block reconstruction error (mean over tokens and channels).

    * ``"mse"``: plain mean squared error; a few massive activation channels/tokens dominate it.
    * ``"token"``: squared error of each token relative to the target token's mean square, i.e. the error
      as the next block's RMSNorm sees it (a token with huge activations counts as much as any other).
    * ``"channel"``: squared error weighted per hidden channel by ``channel_weights`` (the inverse of the
      channel's mean square over the calibration set, :func:`_loss_weights`).
    """
    err = (y.float() - target.float()).pow(2)
    if loss == "mse":
        return err.mean()
    if loss == "token":
        scale = target.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
        return (err / scale).mean()
    if loss == "channel":
        return (err * channel_weights.to(err.device)).mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


@torch.no_grad()
def _eval_loss(block, inputs, targets, rows, kwargs, device, batch_size, loss, channel_weights, autocast) -> float:
    """Mean reconstruction loss over the calibration rows ``rows``."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        x = inputs[idx].to(device, torch.float32)
        with _autocast(device, autocast):
            y = _run_block(block, x, kwargs)
        total += float(reconstruction_loss(y, targets[idx].to(device, torch.float32), loss, channel_weights)) * len(idx)
        count += len(idx)
    return total / max(1, count)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _cast_floating(block: nn.Module, dtype: torch.dtype) -> None:
    """Cast a block's floating parameters and buffers to ``dtype``, leaving packed layers' scales and zero
    points in their storage dtype (``nn.Module.to(dtype)`` would cast those too), and kept QAT layers
    (``keep_qat``) in float32."""
    for module in block.modules():
        if isinstance(module, QATLinear):
            continue
        if isinstance(module, UPQLinear):
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point():
                setattr(module, name, buf.to(dtype))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def _stage(block: nn.Module, device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Put a block on ``device`` in float32 for reconstruction; returns where and in what it was."""
    original = (next(block.parameters()).device, next(p for p in block.parameters() if p.is_floating_point()).dtype)
    _cast_floating(block, torch.float32)
    block.to(device)
    return original


def _unstage(block: nn.Module, original: tuple[torch.device, torch.dtype]) -> None:
    """Undo :func:`_stage`: the block back on its device, in its dtype."""
    _cast_floating(block, original[1])
    block.to(original[0])


def _trainable(module: nn.Module, algorithm: str, bits, group_size, scale_init, scale_dtype) -> nn.Module:
    if algorithm == "lwc":
        return LWCLinear(module, bits, group_size, scale_init, scale_dtype)
    return QATLinear.from_linear(module, bits, group_size, scale_init, scale_dtype)


def _param_groups(modules: Iterable[nn.Module], algorithm: str, lr: float, scale_lr: float) -> list[dict]:
    """Block-AP: weights in units of their group's starting quantization step, scales relative to their
    start, INT4 zero points in codes (:func:`upq_hf.optim.quantized_param_groups`). LWC: the clipping
    logits, plain Adam."""
    if algorithm == "lwc":
        clips = [p for m in modules for p in (m.clip_upper, m.clip_lower) if p is not None]
        return [{"params": clips, "lr": scale_lr}]
    modules = list(modules)
    if lr <= 0:
        for module in modules:
            module.weight.requires_grad_(False)
    return quantized_param_groups(modules, lr, scale_lr, live_units=False)  # frozen weights are left out


def blockwise_ptq(model: nn.Module, input_ids: torch.Tensor, bits: int, group_size: int | None, *,
                  algorithm: str = DEFAULT_ALGORITHM, epochs: int = DEFAULT_EPOCHS, steps: int | None = None,
                  lr: float | None = None, scale_lr: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                  scale_init: str = "mse", scale_dtype: torch.dtype = torch.float16,
                  modules_to_not_convert: Iterable[str] | None = None, device: torch.device | str | None = None,
                  activations_on_device: bool = False, backend: str | None = None, seed: int = 0,
                  keep_qat: bool = False, reference: nn.Module | None = None, loss: str = "mse",
                  holdout: int = 0, eval_every: int = 0, autocast: torch.dtype | None = None,
                  layer_formats: dict[str, tuple[int, int | None]] | None = None,
                  progress: bool = True) -> PTQReport:
    """Quantize ``model`` in place, block by block, replacing its linear layers by packed ``UPQLinear``.

    Args:
        model: a causal LM (or any model with a stack of decoder blocks, see :func:`find_decoder_layers`),
            on the CPU or on ``device``.
        input_ids: calibration tokens, ``(nsamples, seqlen)`` (e.g. :func:`upq_hf.data.calibration_data`).
        bits, group_size: 4 (asymmetric INT4) or 2 (SEQ INT2); input columns per scale, ``None`` per row.
        algorithm: ``"blockap"`` (weights, scales and zero points; default) or ``"lwc"`` (clipping only).
        epochs: passes over the calibration set per block; ``steps`` (optimizer steps per block) overrides.
        lr: learning rate of the latent weights (Block-AP); ``scale_lr``: of the quantization parameters.
            Defaults per algorithm in :data:`DEFAULTS`. Adam, cosine decay to zero over the block's steps.
        batch_size: calibration sequences per step.
        scale_init: RTN start (``"mse"`` grid search or ``"max"``), also the reverting point.
        scale_dtype: storage dtype of the packed scales; training already rounds to it.
        modules_to_not_convert: linear layers (names or suffixes) kept dense; the output embedding always is.
        device: where each block trains (default: the model's device). The rest of the model stays put.
        activations_on_device: keep the two activation sets on ``device`` instead of the CPU.
        backend: forward backend of the resulting ``UPQLinear`` layers.
        keep_qat: leave the decoder blocks' layers as trained :class:`upq_hf.qat.QATLinear` (latent weights
            and scales, same forward pass as the packed layers) instead of packing them (the INT4 stage of
            ``upq`` keeps them to start the INT2 stage from its latent weights). Not a good start for Distill-QAT
            at the same bits: measured on the bundled model, the latent weights sit at the rounding boundaries
            and 30 steps from them collapsed (top-1 0.03 against 0.37 from the packed grid, docs/BENCHMARKS.md).
        reference: a model with the same decoder blocks (e.g. the unquantized teacher) whose blocks give the
            targets, instead of this model's own blocks before quantization.
        loss: the reconstruction error, ``"mse"``, ``"token"`` or ``"channel"`` (:func:`reconstruction_loss`).
        holdout: calibration sequences kept out of training to choose each block's state: every
            ``eval_every`` steps (default: 8 checks per block) the held-out loss is measured, and the block
            ends in the state with the lowest one (its round-to-nearest start included). ``0``: no hold-out;
            the block ends where training ends, or reverts to its start if the calibration loss went up.
        autocast: run the training forward/backward passes under ``torch.autocast`` in this dtype
            (``torch.bfloat16``: about 2.5x faster matrix products on CPUs with AVX512-BF16 and on GPUs);
            targets, held-out checks and the propagated activations stay in float32.
        layer_formats: ``{layer name: (bits, group_size)}`` for layers quantized otherwise than ``bits`` /
            ``group_size`` (mixed precision, e.g. ``k_proj`` and ``v_proj`` kept at INT4).

    Returns a :class:`PTQReport` with each block's reconstruction loss at its RTN start and at the end.
    """
    from tqdm.auto import tqdm

    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    formats.check_bits(bits)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (nsamples, seqlen), got shape {tuple(input_ids.shape)}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0 <= holdout < input_ids.shape[0]:
        raise ValueError(f"holdout must leave calibration sequences to train on: got {holdout} of {input_ids.shape[0]}")
    lr = DEFAULTS[algorithm]["lr"] if lr is None else lr
    scale_lr = DEFAULTS[algorithm]["scale_lr"] if scale_lr is None else scale_lr
    started = time.perf_counter()
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    storage = device if activations_on_device else torch.device("cpu")

    layer_formats = dict(layer_formats or {})
    _canonical(model, bits, group_size, modules_to_not_convert, layer_formats)
    selected = linear_layers(model, modules_to_not_convert)
    unknown = sorted(set(layer_formats) - set(selected))
    if unknown:
        raise ValueError(f"layer_formats names {unknown[0]!r}, which is not one of the layers to quantize")

    def format_of(name: str) -> tuple[int, int | None]:
        return layer_formats.get(name, (bits, group_size))

    check_layers(selected, group_size, layer_formats)
    layers_name, layers = find_decoder_layers(model)
    ref_layers = None
    if reference is not None:
        ref_layers = find_decoder_layers(reference)[1]
        if len(ref_layers) != len(layers):
            raise ValueError(f"reference has {len(ref_layers)} decoder blocks, the model {len(layers)}")
    nsamples, seqlen = input_ids.shape
    # the held-out rows are the last ``holdout`` of a seeded permutation; training draws from the others
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(nsamples, generator=generator) if holdout else torch.arange(nsamples)
    held_rows, train_rows = permutation[nsamples - holdout:], permutation[:nsamples - holdout]
    n_train = len(train_rows)
    batch_size = max(1, min(batch_size, n_train))
    steps_per_epoch = math.ceil(n_train / batch_size)
    total_steps = steps if steps is not None else epochs * steps_per_epoch
    report = PTQReport(algorithm, bits, group_size, nsamples, seqlen, total_steps, layers=list(selected),
                       formats=dict(Counter(format_of(name) for name in selected)))

    checks = eval_every if eval_every > 0 else max(1, total_steps // 8)
    was_training = model.training
    model.eval()
    quant_inputs, kwargs = capture_block_inputs(model, layers, input_ids, device, storage)
    fp_inputs = quant_inputs.clone()
    next_inputs = torch.empty_like(quant_inputs)
    report.capture_seconds = time.perf_counter() - started

    for index, block in enumerate(layers):
        block_started = time.perf_counter()
        prefix = f"{layers_name}.{index}." if layers_name else f"{index}."
        names = [name for name in selected if name.startswith(prefix)]
        original = _stage(block, device)
        requires_grad = {param: param.requires_grad for param in block.parameters()}
        for param in requires_grad:
            param.requires_grad_(False)

        # targets: the unquantized block on the unquantized model's activations (in place)
        if ref_layers is None:
            _block_outputs(block, fp_inputs, kwargs, device, batch_size, out=fp_inputs)
        else:
            ref_block = ref_layers[index]
            ref_original = _stage(ref_block, device)
            _block_outputs(ref_block, fp_inputs, kwargs, device, batch_size, out=fp_inputs)
            _unstage(ref_block, ref_original)
        targets = fp_inputs

        trainable = {}
        for name in names:
            local = name[len(prefix):]
            trainable[local] = _trainable(block.get_submodule(local), algorithm, *format_of(name), scale_init,
                                          scale_dtype)
            replace_module(block, local, trainable[local])
        start_state = {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in trainable.items()}
        channel_weights = _loss_weights(targets, loss, batch_size)
        rtn_loss = _block_outputs(block, quant_inputs, kwargs, device, batch_size, targets=targets, loss=loss,
                                  channel_weights=channel_weights)

        def held_out_loss() -> float:
            return _eval_loss(block, quant_inputs, targets, held_rows, kwargs, device, batch_size, loss,
                              channel_weights, None)

        best_held, best_state = (held_out_loss(), start_state) if holdout else (None, None)

        groups = _param_groups(trainable.values(), algorithm, lr, scale_lr)
        optimizer = StepAdam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))
        bar = tqdm(total=total_steps, desc=f"PTQ {algorithm} INT{bits} block {index + 1}/{len(layers)}",
                   disable=not progress, unit="step", leave=False)
        running = None
        step = 0
        while step < total_steps:
            order = train_rows[torch.randperm(n_train, generator=generator)]
            for start in range(0, n_train, batch_size):
                if step >= total_steps:
                    break
                rows = order[start:start + batch_size]
                x = quant_inputs[rows].to(device, torch.float32)
                target = targets[rows].to(device, torch.float32)
                with _autocast(device, autocast):
                    y = _run_block(block, x, kwargs)
                value_t = reconstruction_loss(y, target, loss, channel_weights)
                optimizer.zero_grad(set_to_none=True)
                value_t.backward()
                optimizer.step()
                schedule.step()
                step += 1
                value = value_t.item()
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4g}", rtn=f"{rtn_loss:.4g}")
                if holdout and (step % checks == 0 or step == total_steps):
                    held = held_out_loss()
                    if held < best_held:
                        best_held = held
                        best_state = {k: {n: t.detach().clone() for n, t in m.state_dict().items()}
                                      for k, m in trainable.items()}
        bar.close()
        del optimizer
        if holdout:
            for key, module in trainable.items():
                module.load_state_dict(best_state[key])

        def install_frozen() -> None:
            for local, module in trainable.items():
                qat = module.to_qat() if isinstance(module, LWCLinear) else module
                if keep_qat:
                    qat.requires_grad_(False)
                    replace_module(block, local, qat)
                else:
                    replace_module(block, local, qat.freeze(scale_dtype, backend=backend))

        # the next block's input: this block, quantized, on the quantized activations
        install_frozen()
        final_loss = _block_outputs(block, quant_inputs, kwargs, device, batch_size, out=next_inputs,
                                    targets=targets, loss=loss, channel_weights=channel_weights)
        reverted = best_state is start_state if holdout else not final_loss < rtn_loss
        if reverted and not holdout:
            for key, module in trainable.items():
                module.load_state_dict(start_state[key])
            install_frozen()
            final_loss = _block_outputs(block, quant_inputs, kwargs, device, batch_size, out=next_inputs,
                                        targets=targets, loss=loss, channel_weights=channel_weights)
        quant_inputs, next_inputs = next_inputs, quant_inputs
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        _unstage(block, original)
        report.blocks.append(BlockStats(index, prefix.rstrip("."), rtn_loss, final_loss,
                                        time.perf_counter() - block_started, reverted))
        if progress:
            tqdm.write(f"block {index + 1}/{len(layers)}: RTN {rtn_loss:.4g} -> {final_loss:.4g}"
                       f"{' (reverted to RTN)' if reverted else ''}")

    # selected linears outside the decoder blocks: round to nearest
    for name, linear in selected.items():
        if not name.startswith(f"{layers_name}."):
            replace_module(model, name, UPQLinear.from_linear(linear, *format_of(name), scale_init, scale_dtype,
                                                              backend))
    model.train(was_training)
    report.seconds = time.perf_counter() - started
    return report
