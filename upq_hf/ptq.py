"""Block-wise post-training quantization (EfficientQAT's Block-AP): the FP -> INT4 and INT4 -> INT2 stages of UPQ.

One decoder block after the other, the block's linear layers become trainable fake-quant layers
(:class:`upq_hf.qat.QATLinear`: latent weights, scales and INT4 zero points, straight-through gradients) that
learn to reconstruct the unquantized model's output of that block (:func:`reconstruction_loss`) from the inputs
the *already quantized* blocks before it produce; then the block is frozen into packed ``UPQLinear`` layers (or
kept as trained QAT layers, ``keep_qat``) and its quantized output becomes the next block's input. Weights move,
so individual roundings flip: it subsumes learnable rounding and learnable clipping (OmniQuant's learnable
clipping alone measured worse at the same cost, docs/BENCHMARKS.md).

Data path: the calibration ``input_ids`` run through the model up to the first decoder block, whose inputs are
captured (with the keyword arguments the model passes its blocks: attention mask, position embeddings, position
ids, ...). Two activation sets of shape ``(nsamples, seqlen, hidden)`` then walk down the stack: the unquantized
model's (``fp``: each block's output on it is the target; with ``reference``, another model's blocks give it)
and the quantized model's (``quant``: the input to the block being trained). Only the block being quantized and
one mini-batch sit on the accelerator (``device``); the activation sets stay on the CPU unless
``activations_on_device=True``, so a model larger than the accelerator still quantizes. Training runs in float32
whatever the model's dtype (bf16 autocast where asked).

Each block ends in the state with the lowest error on the held-out calibration sequences (``PTQConfig.holdout``),
its round-to-nearest start included; without a hold-out it keeps its start if training ends with a higher
error (``reverted``). PTQ is so never worse than round to nearest on the calibration data, block by block.
Linear layers selected for quantization outside the decoder blocks (rare; the output embedding never is) are
rounded to nearest. The hyper-parameters are :class:`upq_hf.stages.PTQConfig`'s.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from . import formats
from .adapters import find_decoder_layers  # noqa: F401 - part of this module's API too
from .convert import _canonical, check_layers, linear_layers, replace_module
from .nn import UPQLinear
from .optim import StepAdam, quantized_param_groups
from .qat import QATLinear
from .stages import PTQConfig


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------

@dataclass
class BlockStats:
    """Reconstruction error of one block (over the calibration set) at its round-to-nearest start and at the end;
    ``reverted`` when it ended at its start."""

    index: int
    name: str
    rtn_loss: float
    final_loss: float
    seconds: float
    reverted: bool = False


@dataclass
class PTQReport:
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
        return (f"PTQ {fmt}: {len(self.blocks)} blocks, {self.nsamples}x{self.seqlen} tokens, "
                f"{self.steps_per_block} steps/block, {self.seconds:.1f} s (capture {self.capture_seconds:.1f} s)")


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
def _block_outputs(block, inputs, kwargs, device, batch_size, out=None, targets=None) -> float:
    """Block outputs for every sample, written into ``out`` (may be ``inputs``: rows are independent);
    returns the reconstruction loss (:func:`reconstruction_loss`) against ``targets`` when given."""
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size].to(device, torch.float32)
        y = _run_block(block, x, kwargs)
        if targets is not None:
            t = targets[start:start + batch_size].to(device, torch.float32)
            total += float(reconstruction_loss(y, t)) * len(x)
        if out is not None:
            out[start:start + batch_size] = y.to(out.device, out.dtype)
    return total / max(1, len(inputs)) if targets is not None else float("nan")


def reconstruction_loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Block reconstruction error: the squared error of each token relative to the target token's mean square,
    i.e. the error as the next block's norm sees it (a token with huge activations counts as much as any other;
    plain MSE, which a few massive tokens dominate, and a per-channel weighting measured worse), averaged over
    tokens and channels."""
    err = (y.float() - target.float()).pow(2)
    scale = target.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
    return (err / scale).mean()


@torch.no_grad()
def _eval_loss(block, inputs, targets, rows, kwargs, device, batch_size, autocast) -> float:
    """Mean reconstruction loss over the calibration rows ``rows``."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        x = inputs[idx].to(device, torch.float32)
        with _autocast(device, autocast):
            y = _run_block(block, x, kwargs)
        total += float(reconstruction_loss(y, targets[idx].to(device, torch.float32))) * len(idx)
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


def _param_groups(modules, learning_rate: float, scale_learning_rate: float) -> list[dict]:
    """Weights in units of their group's starting quantization step, scales relative to their start, INT4 zero
    points in codes (:func:`upq_hf.optim.quantized_param_groups`); a learning rate of 0 freezes the weights."""
    modules = list(modules)
    if learning_rate <= 0:
        for module in modules:
            module.weight.requires_grad_(False)
    return quantized_param_groups(modules, learning_rate, scale_learning_rate, live_units=False)


@dataclass
class _Run:
    """What every block of one :func:`blockwise_ptq` call shares: the format, the activation sets, the rows."""

    config: PTQConfig
    selected: dict
    format_of: object
    scale_init: str
    scale_dtype: torch.dtype
    scale_grid: str | None
    device: torch.device
    backend: str | None
    keep_qat: bool
    autocast: torch.dtype | None
    kwargs: dict
    quant_inputs: torch.Tensor
    fp_inputs: torch.Tensor
    next_inputs: torch.Tensor
    train_rows: torch.Tensor
    held_rows: torch.Tensor
    generator: torch.Generator
    batch_size: int
    total_steps: int
    progress: bool
    spill: str | None = None  # a folder for the start and best states of a block (None: kept in memory)


def _state(trainable: dict, spill: str | None = None, name: str = "state") -> dict | str:
    """A copy of the trainable layers' state; with ``spill`` (a folder), written there instead of kept in memory
    (the path is returned; :func:`_load_state` reads either)."""
    if spill is None:
        return {key: {n: t.detach().clone() for n, t in m.state_dict().items()} for key, m in trainable.items()}
    import os

    path = os.path.join(spill, f"{name}.pt")
    torch.save({key: m.state_dict() for key, m in trainable.items()}, path)
    return path


def _load_state(trainable: dict, state: dict | str) -> None:
    if isinstance(state, str):
        state = torch.load(state, weights_only=True)
    for key, module in trainable.items():
        module.load_state_dict(state[key])


def _train_block(run: _Run, block: nn.Module, trainable: dict, rtn_loss: float, label: str) -> dict | None:
    """Train the block's layers for ``run.total_steps`` steps (Adam, cosine decay); with a hold-out, return the
    state of the lowest held-out error met every ``total_steps / checks`` steps (None: the start was best)."""
    from tqdm.auto import tqdm

    config = run.config

    def held_out() -> float:
        return _eval_loss(block, run.quant_inputs, run.fp_inputs, run.held_rows, run.kwargs, run.device,
                          run.batch_size, None)

    best = (held_out(), None) if len(run.held_rows) else None
    checks = max(1, run.total_steps // config.checks)
    optimizer = StepAdam(_param_groups(trainable.values(), config.learning_rate, config.scale_learning_rate))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (
        1 + math.cos(math.pi * min(step, run.total_steps) / max(1, run.total_steps))))
    bar = tqdm(total=run.total_steps, desc=label, disable=not run.progress, unit="step", leave=False)
    running, step = None, 0
    while step < run.total_steps:
        order = run.train_rows[torch.randperm(len(run.train_rows), generator=run.generator)]
        for start in range(0, len(order), run.batch_size):
            if step >= run.total_steps:
                break
            rows = order[start:start + run.batch_size]
            with _autocast(run.device, run.autocast):
                y = _run_block(block, run.quant_inputs[rows].to(run.device, torch.float32), run.kwargs)
            loss = reconstruction_loss(y, run.fp_inputs[rows].to(run.device, torch.float32))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4g}", rtn=f"{rtn_loss:.4g}")
            if best is not None and (step % checks == 0 or step == run.total_steps):
                if (held := held_out()) < best[0]:
                    best = None  # the state it held goes before the new one is copied: one copy at a time
                    best = (held, _state(trainable, run.spill, "best"))
    bar.close()
    return None if best is None else best[1]


def _install(run: _Run, block: nn.Module, trainable: dict) -> float:
    """Put the block's trained layers in place (packed, or as QAT layers with ``keep_qat``), write the block's
    output on the quantized activations into ``run.next_inputs``; return its reconstruction error."""
    for local, module in trainable.items():
        if run.keep_qat:
            module.requires_grad_(False)
            replace_module(block, local, module)
        else:
            replace_module(block, local, module.freeze(run.scale_dtype, backend=run.backend))
    return _block_outputs(block, run.quant_inputs, run.kwargs, run.device, run.batch_size, out=run.next_inputs,
                          targets=run.fp_inputs)


def _quantize_block(run: _Run, index: int, block: nn.Module, prefix: str, n_blocks: int,
                    ref_block: nn.Module | None) -> BlockStats:
    """Quantize one block: its targets (the unquantized block's outputs), trainable layers from round to nearest,
    training, the state to keep, the packed layers; the quantized activations move on to the next block."""
    started = time.perf_counter()
    original = _stage(block, run.device)
    # the flags to restore, without keeping the dense layers that get replaced alive (weak references)
    requires_grad = weakref.WeakKeyDictionary({param: param.requires_grad for param in block.parameters()})
    for param in requires_grad:
        param.requires_grad_(False)
    target_block = block if ref_block is None else ref_block  # fp_inputs becomes its outputs, in place
    ref_original = None if ref_block is None else _stage(ref_block, run.device)
    _block_outputs(target_block, run.fp_inputs, run.kwargs, run.device, run.batch_size, out=run.fp_inputs)
    if ref_block is not None:
        _unstage(ref_block, ref_original)
    trainable = {}
    for name in (n for n in run.selected if n.startswith(prefix)):
        local = name[len(prefix):]
        trainable[local] = QATLinear.from_linear(block.get_submodule(local), *run.format_of(name), run.scale_init,
                                                 run.scale_dtype, run.scale_grid)
        replace_module(block, local, trainable[local])
    start_state = _state(trainable, run.spill, "start")
    rtn_loss = _block_outputs(block, run.quant_inputs, run.kwargs, run.device, run.batch_size, targets=run.fp_inputs)
    best = _train_block(run, block, trainable, rtn_loss, f"PTQ block {index + 1}/{n_blocks}")
    holdout = len(run.held_rows) > 0
    if holdout:  # the held-out error chose: the best state met, the start if none beat it
        _load_state(trainable, best or start_state)
    final_loss = _install(run, block, trainable)
    reverted = best is None if holdout else not final_loss < rtn_loss
    if reverted and not holdout:
        _load_state(trainable, start_state)
        final_loss = _install(run, block, trainable)
    run.quant_inputs, run.next_inputs = run.next_inputs, run.quant_inputs
    for param, flag in requires_grad.items():
        param.requires_grad_(flag)
    _unstage(block, original)
    return BlockStats(index, prefix.rstrip("."), rtn_loss, final_loss, time.perf_counter() - started, reverted)


def blockwise_ptq(model: nn.Module, input_ids: torch.Tensor, bits: int, group_size: int | None,
                  config: PTQConfig | None = None, *, scale_init: str = "mse", scale_dtype: torch.dtype = torch.float16,
                  modules_to_not_convert=None, layer_formats: dict[str, tuple[int, int | None]] | None = None,
                  device: torch.device | str | None = None, backend: str | None = None, seed: int = 0,
                  keep_qat: bool = False, autocast: torch.dtype | None = None, activations_on_device: bool = False,
                  reference: nn.Module | None = None, scale_grid: str | None = None, progress: bool = True) -> PTQReport:
    """Quantize ``model`` in place, block by block (see the module doc), to ``bits`` (4: asymmetric INT4, 2: SEQ
    INT2) with ``group_size`` input columns per scale (None: per row); ``layer_formats`` names the layers that take
    another format (mixed bits). ``input_ids`` ``(nsamples, seqlen)`` is the calibration; ``config`` the
    hyper-parameters (:class:`upq_hf.stages.PTQConfig`); ``scale_init`` the round-to-nearest start;
    ``keep_qat``: leave the trained QAT layers (latent weights and scales, the packed layers' forward) instead
    of packing them; ``reference``: a model with the same blocks whose blocks give the targets (by default this
    model's own, before quantization); ``autocast``: run the training passes in this dtype; ``scale_grid``: the
    grid SEQ scales are trained on (:data:`upq_hf.formats.SCALE_GRIDS`). Returns a
    :class:`PTQReport` with each block's error at its start and its end."""
    ptq = BlockwisePTQ(model, input_ids, bits, group_size, config, scale_init=scale_init, scale_dtype=scale_dtype,
                       modules_to_not_convert=modules_to_not_convert, layer_formats=layer_formats, device=device,
                       backend=backend, seed=seed, keep_qat=keep_qat, autocast=autocast,
                       activations_on_device=activations_on_device, scale_grid=scale_grid, progress=progress)
    ref_layers = None if reference is None else find_decoder_layers(reference)[1]
    if ref_layers is not None and len(ref_layers) != len(ptq.layers):
        raise ValueError(f"reference has {len(ref_layers)} decoder blocks, the model {len(ptq.layers)}")
    for index in range(len(ptq.layers)):
        ptq.quantize_block(index, None if ref_layers is None else ref_layers[index])
    return ptq.finish()


class BlockwisePTQ:
    """One block-wise PTQ pass, a block at a time: set up (checks, the calibration captured at the first block),
    :meth:`quantize_block` for each block in order, :meth:`finish`. :func:`blockwise_ptq` runs it over a model in
    memory; :mod:`upq_hf.streamed` interleaves two passes (INT4, then INT2 from it) over blocks read from disk.
    The arguments are :func:`blockwise_ptq`'s, and ``spill``: a folder where each block's start and best states
    are written instead of kept in memory (the same arithmetic; two copies of the block's layers less);
    ``activations``: a folder where the three activation streams (the quantized blocks' inputs, the unquantized
    blocks' outputs, the next inputs) are kept in files (:class:`upq_hf.offload.DiskRows`), a step's rows in
    memory at a time (the same arithmetic; ``3 x nsamples x seqlen x hidden`` values less)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, bits: int, group_size: int | None,
                 config: PTQConfig | None = None, *, scale_init: str = "mse", scale_dtype: torch.dtype = torch.float16,
                 modules_to_not_convert=None, layer_formats: dict[str, tuple[int, int | None]] | None = None,
                 device: torch.device | str | None = None, backend: str | None = None, seed: int = 0,
                 keep_qat: bool = False, autocast: torch.dtype | None = None, activations_on_device: bool = False,
                 scale_grid: str | None = None, progress: bool = True, spill: str | None = None,
                 activations: str | None = None):
        config = config or PTQConfig()
        formats.check_bits(bits)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (nsamples, seqlen), got shape {tuple(input_ids.shape)}")
        nsamples, seqlen = input_ids.shape
        holdout = int(config.holdout * nsamples)  # < nsamples: PTQConfig keeps the share under 1
        self.started = time.perf_counter()
        device = torch.device(device) if device is not None else next(model.parameters()).device
        layer_formats = dict(layer_formats or {})
        _canonical(model, bits, group_size, modules_to_not_convert, layer_formats)
        selected = linear_layers(model, modules_to_not_convert)
        unknown = sorted(set(layer_formats) - set(selected))
        if unknown:
            raise ValueError(f"layer_formats names {unknown[0]!r}, which is not one of the layers to quantize")
        check_layers(selected, group_size, layer_formats)
        self.model, self.progress = model, progress
        self.layers_name, self.layers = find_decoder_layers(model)
        # the held-out rows are the last ``holdout`` of a seeded permutation; training draws from the others
        generator = torch.Generator().manual_seed(seed)
        permutation = torch.randperm(nsamples, generator=generator) if holdout else torch.arange(nsamples)
        batch_size = max(1, min(config.batch_size, nsamples - holdout))
        total_steps = config.steps or config.epochs * math.ceil((nsamples - holdout) / batch_size)
        self.report = PTQReport(bits, group_size, nsamples, seqlen, total_steps, layers=list(selected), formats=dict(
            Counter(layer_formats.get(name, (bits, group_size)) for name in selected)))
        self.was_training = model.training
        model.eval()
        storage = device if activations_on_device else torch.device("cpu")
        quant_inputs, kwargs = capture_block_inputs(model, self.layers, input_ids, device, storage)
        if activations is None:
            fp_inputs, next_inputs = quant_inputs.clone(), torch.empty_like(quant_inputs)
        else:  # the three streams in files, a step's rows read at a time (the same values: bit-exact round trips)
            from .offload import DiskRows

            os.makedirs(activations, exist_ok=True)
            quant_inputs = DiskRows.of(os.path.join(activations, "quant_inputs.bin"), quant_inputs)
            fp_inputs = quant_inputs.like(os.path.join(activations, "fp_inputs.bin"), copy=True)
            next_inputs = quant_inputs.like(os.path.join(activations, "next_inputs.bin"))
        self.run = _Run(config, selected, lambda name: layer_formats.get(name, (bits, group_size)), scale_init,
                        scale_dtype, scale_grid, device, backend, keep_qat, autocast, kwargs, quant_inputs,
                        fp_inputs, next_inputs, permutation[:nsamples - holdout],
                        permutation[nsamples - holdout:], generator, batch_size, total_steps, progress, spill)
        self.report.capture_seconds = time.perf_counter() - self.started

    def prefix(self, index: int) -> str:
        """The name of block ``index``'s layers up to theirs (``model.layers.3.``)."""
        return f"{self.layers_name}.{index}." if self.layers_name else f"{index}."

    def quantize_block(self, index: int, ref_block: nn.Module | None = None) -> BlockStats:
        """Quantize block ``index`` (the next one: blocks go in order) and move the activations past it."""
        prefix = self.prefix(index)
        for name in self.run.selected:  # the block's dense layers get replaced: keep their names, not the modules
            if name.startswith(prefix):
                self.run.selected[name] = None
        stats = _quantize_block(self.run, index, self.layers[index], prefix, len(self.layers), ref_block)
        self.report.blocks.append(stats)
        if self.progress:
            print(f"block {index + 1}/{len(self.layers)}: RTN {stats.rtn_loss:.4g} -> {stats.final_loss:.4g}"
                  f"{' (reverted to RTN)' if stats.reverted else ''}", flush=True)
        return stats

    def finish(self) -> PTQReport:
        """Round to nearest the selected linears outside the decoder blocks; the report."""
        run = self.run
        for name, linear in run.selected.items():
            if not name.startswith(f"{self.layers_name}."):
                replace_module(self.model, name, UPQLinear.from_linear(
                    linear, *run.format_of(name), run.scale_init, run.scale_dtype, run.backend, run.scale_grid))
        self.model.train(self.was_training)
        self.report.seconds = time.perf_counter() - self.started
        return self.report
