"""The ``"cpu"`` backend: torch's own INT4 weight-only CPU kernel under a ``UPQLinear``.

torch ships ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)``
(weights packed by ``torch.ops.aten._convert_weight_to_int4pack_for_cpu``). Its convention, probed
against a reference on torch 2.13 (and checked by ``tests/test_int4pack.py``):

* ``packed = _convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)`` takes codes ``q`` of shape
  ``(N, K)``, int32 in ``0..15``, and returns ``(N, K / 2)`` uint8 (the same bytes for any
  ``inner_k_tiles``); N must be a multiple of 16.
* ``y = x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``, ``g = k // group_size``;
  ``scales_and_zeros`` is ``(K / group_size, N, 2)`` (scale, zero) in the dtype of ``x``.
* ``group_size`` must be 32, 64, 128 or 256 and divide K; ``x`` fp32, fp16 or bf16, 2-D.
* The weight is dequantized and the products accumulated in fp32; only the output is rounded to
  the activation dtype. Only the bf16 path is fast (fp32 and fp16 activations run an order of magnitude
  slower, docs/BENCHMARKS.md), so every activation is computed in bf16.

Both UPQ formats are affine per group, so they map onto it without changing the on-disk format:

* SEQ INT2 ``w = s (k - 1.5)``, ``k`` in 0..3: kernel codes ``q = k + 6`` and ``zero = s' / 2``
  (``s'`` the scale rounded to bf16), so ``W = s' (k - 2) + s' / 2 = s' (k - 1.5)``: the only error
  is the scale's rounding, ``|W - w| <= u |w|`` with ``u = 2**-8`` (bf16's unit roundoff); halving
  is exact.
* INT4 ``w = s (k - z)``: ``q = k`` and ``zero = bf16(s' (8 - z))``, so ``|W - w| <= u |w| + u |8 - z| s'``.
* Per-row scales (``group_size=None``) and group sizes the kernel does not take but a multiple of 32
  (e.g. 512) are expressed with the largest supported group size dividing them, each scale repeated.
* N not a multiple of 16 is padded with zero rows (scale and zero 0) and the output sliced.

A layer with ``in_features`` not a multiple of 32 or a group size that is not a multiple of 32
(e.g. 16) runs on the reference path (:func:`upq_hf.backends.torch_linear`), as do calls with more
than :data:`MAX_ROWS` rows (prefill: the kernel's cost grows with every row, dequantize + matmul's
does not; see docs/BENCHMARKS.md), calls that need a gradient for ``x`` (the kernel has no
backward), and calls under ``torch.compile`` (the reference path compiles).

The repacked weight is made on the first forward and cached on the module as a plain attribute, not
a buffer: ``state_dict``/``save_pretrained`` never see it and ``.to()`` drops it. It is rebuilt when
the packed buffers are replaced or modified in place (their identity and version counters are
checked on every call; buffers made under ``torch.inference_mode()`` have no version counter, so
an in-place change to one is not seen: call :func:`drop_cache` after it) or move device. Cost in
resident memory: 0.5 byte per weight for the 4-bit codes plus 4 bytes (bf16 scale and zero) per kernel
group and output, on top of the stored buffers (INT2 g64: 0.5625 byte per weight, next to the 0.281
stored: 0.84 byte in all, 0.42x of bf16).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # largest first
N_MULTIPLE = 16
# Rows above which a call takes the reference path (dequantize + matmul): the kernel's time grows
# linearly with the rows, the reference's dequantization is paid once per call; the crossover lies above this
# for every layer measured (docs/BENCHMARKS.md).
MAX_ROWS = 128
COMPUTE_DTYPE = torch.bfloat16
UNIT_ROUNDOFF = 2.0 ** -8  # bf16 has 8 significant bits
CACHE_ATTRIBUTE = "_int4pack_cache"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when this torch build has the CPU INT4 kernel and it runs (checked once on a tiny layer)."""
    aten = torch.ops.aten
    if not (hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")):
        return False
    try:
        codes = torch.full((N_MULTIPLE, 32), 9, dtype=torch.int32)
        packed = aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        scales_and_zeros = torch.zeros(1, N_MULTIPLE, 2, dtype=COMPUTE_DTYPE)
        scales_and_zeros[..., 0] = 1.0
        y = aten._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=COMPUTE_DTYPE), packed, 32, scales_and_zeros)
    except Exception:  # noqa: BLE001 - missing kernel for this CPU/build: use the reference path
        return False
    return bool((y == 32).all())  # (9 - 8) * 1 + 0, summed over 32 columns


def kernel_group_size(in_features: int, group_size: int | None) -> int | None:
    """The group size the kernel runs a layer with (scales repeated to fill it), or None if none fits."""
    span = in_features if group_size is None else group_size
    if in_features % 32:
        return None
    return next((g for g in KERNEL_GROUP_SIZES if span % g == 0), None)


def unsupported_reason(module) -> str | None:
    """Why this layer cannot run on the kernel (it then takes the reference path), or None."""
    if kernel_group_size(module.in_features, module.group_size) is None:
        what = "in_features" if module.in_features % 32 else "group_size"
        value = module.in_features if what == "in_features" else module.group_size
        return f"{what}={value} is not a multiple of 32 (the kernel takes groups of {sorted(KERNEL_GROUP_SIZES)})"
    if module.weight.device.type != "cpu":
        return f"the packed weight is on {module.weight.device}, the kernel runs on CPU tensors"
    return None


class Int4Pack(NamedTuple):
    """A layer repacked for the kernel."""

    packed: torch.Tensor  # (N padded to 16, K / 2) uint8, the kernel's layout
    scales_and_zeros: torch.Tensor  # (K / group_size, N padded, 2) bf16
    group_size: int
    out_features: int  # N before padding

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()


def repack(module) -> Int4Pack:
    """The kernel's form of a ``UPQLinear``'s weight (see the module docstring for the mapping)."""
    group = kernel_group_size(module.in_features, module.group_size)
    if group is None:
        raise ValueError(f"UPQLinear({module.in_features}, {module.out_features}) cannot run on the INT4 CPU kernel: "
                         f"{unsupported_reason(module)}")
    with torch.no_grad():
        codes = module.codes().to(torch.int32)  # (N, K)
        scale = module.weight_scale.to(COMPUTE_DTYPE).float()  # (G, N), rounded once to bf16
        if module.bits == 2:
            codes += 6  # k - 1.5 == (k + 6) - 8 + 0.5
            zero = scale * 0.5  # exact
        else:
            zero = scale * (8.0 - module.weight_zero.float())  # exact in fp32, rounded once below
        scales_and_zeros = torch.stack([scale, zero], dim=-1).to(COMPUTE_DTYPE)  # (G, N, 2)
        span = module.in_features if module.group_size is None else module.group_size
        if span != group:
            scales_and_zeros = scales_and_zeros.repeat_interleave(span // group, dim=0)
        n_out = module.out_features
        pad = -n_out % N_MULTIPLE
        if pad:  # zero rows: code 8 with scale 0 and zero 0 is a weight of exactly 0
            codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
            scales_and_zeros = torch.cat([scales_and_zeros,
                                          scales_and_zeros.new_zeros(scales_and_zeros.shape[0], pad, 2)], dim=1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    return Int4Pack(packed, scales_and_zeros.contiguous(), group, n_out)


def _packed_buffers(module) -> tuple:
    """``(weight, weight_scale, weight_zero)`` by plain dict lookups: on the hot path of every decode step,
    ``nn.Module.__getattr__`` per buffer costs more than a small layer's kernel call. SEQ INT2 has no
    ``weight_zero`` buffer (a plain ``None`` attribute)."""
    buffers = module._buffers
    zero = buffers["weight_zero"] if "weight_zero" in buffers else module.__dict__.get("weight_zero")
    return buffers["weight"], buffers["weight_scale"], zero


def _version(tensor: torch.Tensor | None) -> int | None:
    """A buffer's version counter, or None for an inference tensor (made under ``torch.inference_mode()``),
    which has none: reading it raises. In-place changes to such a buffer are not seen; call
    :func:`drop_cache` after one."""
    if tensor is None or tensor.is_inference():
        return None
    return tensor._version


def _identity(module) -> tuple:
    """What the cache was made from: the packed buffers themselves and their version counters (bumped by
    every in-place change). Held strongly, so that a freed tensor's address can never be mistaken for it."""
    weight, scale, zero = _packed_buffers(module)
    return (weight, _version(weight), scale, _version(scale), zero, _version(zero))


def _matches(identity: tuple, module) -> bool:
    # the same tensor object keeps its inference-ness, so a None version stays None: no check for it here
    weight, scale, zero = _packed_buffers(module)
    return (identity[0] is weight and (identity[1] is None or identity[1] == weight._version)
            and identity[2] is scale and (identity[3] is None or identity[3] == scale._version)
            and identity[4] is zero and (identity[5] is None or identity[5] == zero._version))


def cached_pack(module) -> Int4Pack | None:
    """The module's repacked weight, made once and reused until its packed buffers change;
    None when the layer cannot run on the kernel."""
    cache = module.__dict__.get(CACHE_ATTRIBUTE)
    if cache is not None and _matches(cache[0], module):
        return cache[1]
    pack = None if unsupported_reason(module) is not None else repack(module)
    module.__dict__[CACHE_ATTRIBUTE] = (_identity(module), pack)
    return pack


def drop_cache(module) -> None:
    module.__dict__.pop(CACHE_ATTRIBUTE, None)


def is_packed_layer(module) -> bool:
    """Whether ``module`` has a ``UPQLinear``'s packed form (int32 ``weight`` codes, ``weight_scale``,
    ``codes()``): matched by that interface, since this module sits below :mod:`upq_hf.nn` in the import
    order (``nn`` -> ``backends`` -> ``int4pack``) and cannot import the class."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dtype == torch.int32
            and isinstance(getattr(module, "weight_scale", None), torch.Tensor) and callable(getattr(module, "codes", None)))


def prepare(model) -> int:
    """Repack every ``UPQLinear`` of ``model`` that the kernel takes now rather than on its first
    forward. Returns the bytes the repacked weights hold."""
    total = 0
    for module in model.modules():
        if is_packed_layer(module):
            pack = cached_pack(module)
            total += 0 if pack is None else pack.nbytes
    return total


def takes(x: torch.Tensor, module) -> bool:
    """Whether this call can run on the kernel (else the reference path runs)."""
    if not x.is_cpu or x.dtype not in _ACTIVATION_DTYPES:
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False  # no backward through the kernel: the reference path is differentiable
    if torch.compiler.is_compiling():
        return False
    return 0 < x.numel() <= MAX_ROWS * module.in_features


_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_mm = torch.ops.aten._weight_int4pack_mm_for_cpu if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else None


def linear(x: torch.Tensor, module) -> torch.Tensor | None:
    """``module(x)`` on the kernel, or None where the kernel does not take the call (the caller,
    :func:`upq_hf.backends.linear_forward`, then runs the reference path).

    This runs once per layer per decoded token, and in a decode loop each Python-level tensor operation
    here costs several microseconds (docs/BENCHMARKS.md): hence ``is_cpu`` rather than ``device.type``,
    one ``view`` in and one out, and no call that does nothing (``contiguous``, a same-dtype ``to``)."""
    if not x.is_cpu:
        raise RuntimeError(f"UPQ backend 'cpu' runs on CPU tensors, got a tensor on {x.device}; "
                           "use backend='triton' or 'torch' for it")
    if not takes(x, module):
        return None
    pack = cached_pack(module)
    if pack is None:
        return None
    k = module.in_features
    rows = x.view(-1, k) if x.is_contiguous() else x.reshape(-1, k).contiguous()
    if rows.dtype != COMPUTE_DTYPE:
        rows = rows.to(COMPUTE_DTYPE)
    y = _mm(rows, pack.packed, pack.group_size, pack.scales_and_zeros)
    n_out = pack.out_features
    if y.shape[1] != n_out:
        y = y[:, :n_out].contiguous()
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    bias = module._parameters.get("bias")  # a plain lookup, as in _packed_buffers
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(x.shape[:-1] + (n_out,))
