"""The one place that knows how UPQ codes are laid out in memory and on disk.

Storage format, version 2 (``UPQConfig.format_version``; version 1 reads the same way):

* A quantized ``nn.Linear`` of ``out_features = N`` and ``in_features = K`` has integer codes
  ``codes[n, k]`` in ``[0, 2**bits)`` (``bits`` is 2 or 4).
* Codes are packed **along K** into ``int32`` words, ``P = 32 // bits`` codes per word
  (16 for INT2, 8 for INT4), **lowest bits first**: input column ``k`` of output row ``n`` lives in
  word ``packed[k // P, n]`` at bit offset ``(k % P) * bits``. The packed tensor therefore has
  shape ``(ceil(K / P), N)`` (K-major, transposed like GPTQ's ``qweight``). When K is not a
  multiple of P the last word is padded with code 0; the padding is never read back.
  The tensor is stored under the module's ``weight`` key, so a model loaded without the plugin
  fails loudly with a shape mismatch instead of loading garbage.
* Scales are stored transposed too, shape ``(G, N)`` with ``G = K // group_size`` groups along K
  (``G = 1`` for one scale per output row), in ``weight_scale``.
* INT4 also stores a floating zero point per group, shape ``(G, N)``, in ``weight_zero``;
  the weight is ``w[n, k] = scale[g, n] * (codes[n, k] - zero[g, n])`` with ``g = k // group_size``.
  INT2 (SEQ) has no zero tensor: its zero is the constant 1.5, ``w = scale * (codes - 1.5)``.

* Version 2 (upq_hf 0.2) is written where the model's canonical layout (:mod:`upq_hf.adapters`) differs from its
  family's, under the model's own names (no transformers conversion applies on save or load): fused MoE experts
  one layer per expert and projection (``mlp.experts.3.down_proj.weight``), a ``Conv1D`` as the ``nn.Linear`` of
  its transposed weight, a fused projection split one layer per role (``attn.c_attn.k_proj.weight``). A version-1
  reader would load such experts as missing (randomly initialised): it refuses version 2. Every other model is
  written as version 1, which older upq_hf reads; a version-1 checkpoint (``nn.Linear`` layers alone, saved in the
  family's layout) loads as it was.

Everything else in the package (formats, modules, kernels) works on codes in their natural
``(N, K)`` orientation and calls :func:`pack_codes` / :func:`unpack_codes` here.
"""

from __future__ import annotations

import torch

from .formats import check_bits, effective_group_size, num_groups

FORMAT_VERSION = 2


def codes_per_word(bits: int) -> int:
    """How many ``bits``-wide codes one int32 word holds."""
    return 32 // check_bits(bits)


def packed_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int]:
    """Shape of the packed ``weight`` tensor of an ``out_features x in_features`` layer."""
    per_word = codes_per_word(bits)
    return (-(-in_features // per_word), out_features)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(N, K)`` integer codes into an ``(ceil(K/P), N)`` int32 tensor (see module doc)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    per_word = codes_per_word(bits)
    n_out, n_in = codes.shape
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    n_words = -(-n_in // per_word)
    pad = n_words * per_word - n_in
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    # (N, words, P) -> shift each code into place and sum the disjoint bit fields
    codes = codes.view(n_out, n_words, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (codes << shifts).sum(dim=-1)  # int64 in [0, 2**32)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement into int32
    return words.to(torch.int32).t().contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(ceil(K/P), N)`` int32 -> ``(N, K)`` uint8 codes."""
    per_word = codes_per_word(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    n_words, _ = packed.shape
    if n_words * per_word < in_features or (n_words - 1) * per_word >= in_features:
        raise ValueError(
            f"packed tensor with {n_words} words per row cannot hold exactly {in_features} "
            f"{bits}-bit codes (expected {-(-in_features // per_word)} words)"
        )
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    mask = (1 << bits) - 1
    # arithmetic shift on int32 sign-extends the top field: always mask after the shift
    fields = (packed.t().unsqueeze(-1) >> shifts) & mask  # (N, words, P)
    return fields.reshape(packed.shape[1], n_words * per_word)[:, :in_features].to(torch.uint8)


def bits_per_weight(bits: int, group_size: int | None, in_features: int, scale_bytes: int = 2,
                    has_zero: bool | None = None) -> float:
    """Storage cost of one quantized weight: code bits plus the amortised scale (and zero)."""
    n_groups = num_groups(in_features, effective_group_size(in_features, group_size))
    if has_zero is None:
        has_zero = bits == 4
    extra = n_groups * scale_bytes * 8 * (2 if has_zero else 1)
    return bits + extra / in_features
