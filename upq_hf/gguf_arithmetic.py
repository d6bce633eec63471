"""A UPQ model computing as llama.cpp computes its exported GGUF: predict, in Python, what the file will do.

:mod:`upq_hf.gguf_export` writes every quantized layer exactly (the weights llama.cpp holds are upq_hf's, bit for
bit). The numbers still differ, because llama.cpp's arithmetic is not upq_hf's: on the CPU it rounds each
quantized layer's *activations* to int8 before the dot products, stores the KV cache in fp16 and feeds fp16
tensors fp16 inputs. On a 2-bit model that moves about 2% of the top-1 picks, as many as running upq_hf in bf16
instead of fp32 does (docs/BENCHMARKS.md, "GGUF export and llama.cpp").

:func:`llama_cpp_arithmetic` makes an fp32 model do the same rounding, step for step, as llama.cpp's CPU backend
(ggml 0.3.x, ``ggml-cpu/arch/x86/quants.c``; flash attention off, as llama-cpp-python runs by default):

* a layer exported as ``Q4_0`` (SEQ INT2): its input rounded per block of 32 to ``Q8_0``,
  ``q = round_half_even(x * 127 / max|x|)``, ``d = fp16(max|x| / 127)``; the product over each block
  ``d_w d_x sum(q_w q_x)``, summed in fp32;
* ``Q4_1`` (INT4): the same int8 rounding (``Q8_1``); the minimum's term uses the block's stored sum
  ``fp16(d_x sum(q_x))`` (``d_x`` before fp16 rounding), as llama.cpp does;
* ``Q2_K`` (SEQ INT2 on the Q2_K grid): ``Q8_K`` per block of 256, ``q = min(127, round_half_even(x * -127 /
  m))`` where ``m`` is the element of largest magnitude (signed), ``d = 1 / (-127 / m)`` in fp32;
* dense tensors written ``F16`` (the embedding, a tied or dense head): weights and inputs in fp16, products
  in fp32 (``BF16``: both in bf16; ``F32``: exact);
* attention: queries, keys and values in fp16 (an F16 KV cache), scores and softmax in fp32, the softmax
  weights in fp16 before they multiply the values.

The weights are read from the very blocks the export writes (:func:`upq_hf.gguf_export.packed_tensor`), decoded by
the ``gguf`` package. What is left between this and llama.cpp is the order of fp32 sums (and llama.cpp's own rope
and softmax code), not a rounding step.

    with llama_cpp_arithmetic(model):          # model in fp32
        logits = model(ids).logits            # what llama.cpp's logits of the exported file will be
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import UPQLinear

Q8_BLOCK = 32  # elements per Q8_0 / Q8_1 block
Q8_K_BLOCK = 256  # elements per Q8_K block
ATTENTION = "upq_llama_cpp"  # the attention implementation registered with transformers while emulating


def q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's ``Q8_0``/``Q8_1`` of fp32 rows ``x`` ``(M, K)``, K a multiple of 32: the int8 codes ``q``
    ``(M, K / 32, 32)`` as floats, each block's fp16 scale ``d16`` and its fp32 scale ``d`` ``(M, K / 32, 1)``."""
    blocks = x.float().reshape(x.shape[0], -1, Q8_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inverse = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse)  # _mm256_round_ps(_MM_ROUND_NEAREST): ties to even, as torch.round
    return q, d.half().float(), d


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``Q8_K`` of fp32 rows ``x`` ``(M, K)``, K a multiple of 256, dequantized: ``d * q``."""
    blocks = x.float().reshape(x.shape[0], -1, Q8_K_BLOCK)
    signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # the first of largest magnitude
    iscale = torch.where(signed_max != 0, -127.0 / signed_max, torch.zeros_like(signed_max))
    q = torch.round(iscale * blocks).clamp(max=127)
    d = torch.where(iscale != 0, 1.0 / iscale, torch.zeros_like(iscale))
    return (d * q).reshape(x.shape)


def _blocks_weight(layer: UPQLinear) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """``(type, weight as llama.cpp holds it (fp32, (N, K)), Q4_1's per-block minimum (N, K / 32) or None)``."""
    import gguf

    from .gguf_export import packed_tensor

    data, kind = packed_tensor(layer)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    weight = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))
    weight = weight.reshape(layer.out_features, layer.in_features)
    mins = None
    if kind == "Q4_1":  # block: fp16 d, fp16 m, 16 bytes of codes
        blocks = np.ascontiguousarray(data).reshape(layer.out_features, -1, 20)
        mins = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32))
    return kind, weight, mins


def quantized_linear(x: torch.Tensor, kind: str, weight: torch.Tensor, mins: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's product of activations ``x`` ``(..., K)`` with a ``kind`` (``Q4_0``, ``Q4_1``, ``Q2_K``)
    weight, given as it decodes (``weight`` fp32 ``(N, K)``; ``mins``: Q4_1's per-block minimum ``(N, K / 32)``)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if kind == "Q2_K":
        y = q8_k(rows) @ weight.t()
    else:
        q, d16, d = q8_0(rows)
        y = (q * d16).reshape(rows.shape) @ weight.t()
        if kind == "Q4_1":  # m_w * fp16(d_x sum q_x) in place of the m_w * d16_x * sum q_x the product above has
            total = q.sum(-1, keepdim=True)
            y = y + ((d * total).half().float() - d16 * total).squeeze(-1) @ mins.t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _round(tensor: torch.Tensor, dense_type: str) -> torch.Tensor:
    if dense_type == "F16":
        return tensor.to(torch.float16).float()
    if dense_type == "BF16":
        return tensor.to(torch.bfloat16).float()
    return tensor.float()


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """llama.cpp's attention without flash attention, F16 KV cache: ``softmax(k16 . q16 * scale + mask)``,
    the weights rounded to fp16 before they multiply ``v16``."""
    groups = query.shape[1] // key.shape[1]
    q = query.half().float()
    k = key.half().float().repeat_interleave(groups, dim=1)
    v = value.half().float().repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]].float()
    weights = torch.softmax(scores, dim=-1)
    out = weights.half().float() @ v
    return out.transpose(1, 2).contiguous().to(query.dtype), weights


@contextlib.contextmanager
def llama_cpp_arithmetic(model: nn.Module, dense_type: str = "F16"):
    """Within the block, ``model`` (fp32) computes its forward as llama.cpp computes the GGUF that
    :func:`upq_hf.gguf_export.export_gguf` writes of it with ``dense_type`` (see the module doc). Layers that
    the export cannot hold exactly are refused. One sequence per row, no padding beyond what a causal mask
    holds."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    from .gguf_export import _unexportable

    if dense_type not in ("F16", "BF16", "F32"):
        raise ValueError(f"dense_type must be 'F16', 'BF16' or 'F32', got {dense_type!r}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"llama_cpp_arithmetic needs the model in float32 (llama.cpp computes in fp32), not {dtype}")
    patched = []
    hooks = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, UPQLinear):
                why = _unexportable(module)
                if why is not None:
                    raise ValueError(f"{name} has {why}: the GGUF export cannot hold it, so there is nothing to "
                                     f"emulate")
                kind, weight, mins = _blocks_weight(module)
                module.forward = (lambda x, k=kind, w=weight, m=mins, b=module.bias:
                                  quantized_linear(x, k, w, m, b).to(x.dtype))
                patched.append(module)
            elif isinstance(module, nn.Linear):
                weight = _round(module.weight.detach(), dense_type)
                module.forward = (lambda x, w=weight, b=module.bias:
                                  F.linear(_round(x, dense_type), w, None if b is None else b.float()).to(x.dtype))
                patched.append(module)
            elif isinstance(module, nn.Embedding):
                hooks.append(module.register_forward_hook(lambda mod, args, out: _round(out, dense_type)))
        AttentionInterface.register(ATTENTION, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)
        configs = list({id(m.config): m.config for m in model.modules()
                        if hasattr(getattr(m, "config", None), "_attn_implementation")}.values())
        saved = [c._attn_implementation for c in configs]
        for c in configs:
            c._attn_implementation = ATTENTION
        try:
            yield model
        finally:
            for c, value in zip(configs, saved):
                c._attn_implementation = value
    finally:
        for module in patched:
            del module.forward
        for hook in hooks:
            hook.remove()
