"""Export a UPQ checkpoint as a GGUF file that llama.cpp runs with the same weights.

Each quantized layer goes into the llama.cpp block type that holds its format exactly:

* SEQ INT2, ``w = s (k - 1.5)``: ``Q4_0``, ``w = d (q - 8)`` with ``d = s / 2`` and ``q = 2 k + 5`` (q in
  {5, 7, 9, 11}): bit for bit, for any group size that is a multiple of 32 (or one scale per row), on rows whose
  length is a multiple of 32. A container, not a size win: 4.5 bits per weight on disk (4.25 + the scale).
* SEQ INT2 trained on the Q2_K grid (``UPQConfig(scale_grid="q2_k")``: groups of 16, each scale an integer
  multiple ``c`` in 1..15 of one ``d`` per 256 columns): ``Q2_K``, ``w = d sc q - dmin m`` with ``sc = m = c``,
  ``q = k`` and ``dmin = 1.5 d``: bit for bit, at 2.625 bits per weight.
* asymmetric INT4, ``w = s (k - z)``: ``Q4_1``, ``w = d q + m`` with ``d = s``, ``q = k`` and ``m = -s z``
  rounded to fp16: exact to that one rounding of ``m`` (``s z`` is the product of an fp16 scale and an
  integer up to 15, which fp16 holds exactly where it has the bits, and to within half an fp16 step elsewhere).

A layer no type can hold exactly (its rows not a multiple of 32, a group size that is not a multiple of 32) is
an error naming it, unless ``fallback="dense"``, which writes it dense (its dequantized weight in the dense
tensors' type) and says so in the returned report. Nothing is ever re-quantized.

The rest follows llama.cpp's own converter (``convert_hf_to_gguf.py``): the architecture's metadata, the
tensor names (``blk.N.attn_q.weight``), the query/key rows permuted into llama.cpp's rotary layout (a row
permutation: exact on packed rows), the dense tensors (embeddings, norms, the output head where untied) in
their own dtype (bf16 as ``BF16``, fp32 as ``F32``; ``F16`` on request), and the tokenizer (a byte-level BPE's
tokens, types, merges, special ids, chat template).

Supported architectures: :data:`ARCHITECTURES` (the Llama family: Llama, Mistral, SmolLM2, TinyLlama, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .formats import Q2_K_GROUP, Q2_K_SUPER
from .nn import UPQLinear

#: transformers model_type -> GGUF architecture (those whose tensors and metadata this exporter writes)
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
#: tokenizer.ggml.pre by the tokenizer's name (llama.cpp tells pre-tokenizers apart by a hash of a test
#: string's tokens; the families upq_hf is used with are named here, others get llama.cpp's "default")
PRE_TOKENIZERS = {"smollm": "smollm", "llama-3": "llama-bpe", "llama3": "llama-bpe", "qwen2": "qwen2"}
BLOCK = 32  # elements per Q4_0 / Q4_1 block


@dataclass
class ExportReport:
    """What :func:`export_gguf` wrote: ``path``, ``types`` (``{GGUF tensor name: type name}``), ``fallbacks``
    (``{layer: why}`` of the layers written dense), and the file's size."""

    path: str
    types: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    bytes: int = 0

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for kind in self.types.values():
            counts[kind] = counts.get(kind, 0) + 1
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        return f"{self.path}: {len(self.types)} tensors ({kinds}), {self.bytes / 2 ** 20:.1f} MiB"


# ------------------------------------------------------------------------------------------------- blocks

def _fp16_bits(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``(..., 32)`` 4-bit values -> ``(..., 16)`` bytes: element j in the low nibble of byte j, element j + 16 in
    its high nibble (ggml's Q4_0/Q4_1 layout)."""
    q = q.astype(np.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _per_block(values: np.ndarray, group_size: int, in_features: int) -> np.ndarray:
    """``(N, G)`` per-group values -> ``(N, K / 32)`` per 32-element block (a group spans whole blocks)."""
    return np.repeat(values, group_size // BLOCK, axis=1) if values.shape[1] > 1 else np.repeat(
        values, in_features // BLOCK, axis=1)


def seq_to_q4_0(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> np.ndarray:
    """SEQ INT2 codes ``(N, K)`` and fp16 scales ``(N, G)`` as Q4_0 blocks, ``(N, K / 32 * 18)`` bytes."""
    n, k = codes.shape
    q = codes.numpy().astype(np.uint8).reshape(n, k // BLOCK, BLOCK) * 2 + 5
    d = _per_block(scale.float().numpy() / 2, group_size, k)  # s / 2: exact in fp16 (a power-of-two step)
    return np.concatenate([_fp16_bits(d), _nibbles(q)], axis=-1).reshape(n, -1)


def int4_to_q4_1(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> np.ndarray:
    """Asymmetric INT4 codes ``(N, K)``, fp16 scales and zero points ``(N, G)`` as Q4_1 blocks, ``(N, K / 32 *
    20)`` bytes: ``d = s``, ``m = -s z`` rounded to fp16."""
    n, k = codes.shape
    s = scale.float().numpy()
    d = _per_block(s, group_size, k)
    m = _per_block(-s * zero.float().numpy(), group_size, k)
    q = codes.numpy().astype(np.uint8).reshape(n, k // BLOCK, BLOCK)
    return np.concatenate([_fp16_bits(d), _fp16_bits(m), _nibbles(q)], axis=-1).reshape(n, -1)


def q2_k_steps(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(d, c)`` of SEQ scales ``(N, G)`` (groups of 16) on the Q2_K grid: per 256 columns one ``d`` of 6
    significant bits, each scale ``d c`` with integer ``c`` in 1..15, exactly; None where they are not. The
    largest scale of a super-block is ``d c_top`` for some ``c_top``: each is tried, 15 first."""
    s = scale.float().reshape(scale.shape[0], -1, Q2_K_GROUP)
    top = s.amax(-1, keepdim=True)
    found_d = torch.zeros_like(top)
    for c_top in range(15, 0, -1):
        d = top / c_top
        c = torch.round(s / d)
        exact = (c * d == s) & (c >= 1) & (c <= 15)
        grid = d.half().float() == d  # d itself in fp16 ...
        grid &= ((d * 1.5).half().float() == d * 1.5)  # ... and dmin = 1.5 d too
        ok = exact.all(-1, keepdim=True) & grid & (found_d == 0)
        found_d = torch.where(ok, d, found_d)
    if bool((found_d == 0).any()):
        return None
    return found_d.squeeze(-1), torch.round(s / found_d).to(torch.uint8).reshape(scale.shape)


def seq_to_q2_k(codes: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> np.ndarray:
    """SEQ INT2 codes ``(N, K)`` on the Q2_K grid (``d`` ``(N, K / 256)``, ``c`` ``(N, K / 16)``) as Q2_K blocks,
    ``(N, K / 256 * 84)`` bytes: 16 bytes of ``sc | m << 4``, 64 bytes of 2-bit codes (element ``128 n + 32 j + 16 h
    + l`` in bits ``2 j`` of byte ``32 n + 16 h + l``), fp16 ``d`` and ``dmin``."""
    n, k = codes.shape
    scales = c.numpy().astype(np.uint8).reshape(n, k // Q2_K_SUPER, 16)
    scales = scales | (scales << 4)
    q = codes.numpy().astype(np.uint8).reshape(n, k // Q2_K_SUPER, 2, 4, 2, 16)  # (n, j, h, l)
    qs = (q << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1, 1)).sum(axis=3, dtype=np.uint8)
    qs = qs.reshape(n, k // Q2_K_SUPER, 64)
    dd = d.numpy().reshape(n, k // Q2_K_SUPER)
    return np.concatenate([scales, qs, _fp16_bits(dd), _fp16_bits(dd * 1.5)], axis=-1).reshape(n, -1)


def _unexportable(layer: UPQLinear) -> str | None:
    """Why ``layer`` has no exact llama.cpp type, or None."""
    if layer.in_features % BLOCK:
        return f"rows of {layer.in_features} inputs (llama.cpp's blocks hold 32)"
    if _q2_k(layer) is not None:
        return None
    if layer.group_size is not None and layer.group_size % BLOCK:
        return (f"group size {layer.group_size} (a scale per 32-element block needs a multiple of 32, or the Q2_K "
                f"grid: scale_grid='q2_k')")
    return None


def _q2_k(layer: UPQLinear):
    """``(d, c)`` where ``layer`` is SEQ INT2 on the Q2_K grid (groups of 16, rows a multiple of 256), else None."""
    if layer.bits != 2 or layer.group_size != Q2_K_GROUP or layer.in_features % Q2_K_SUPER:
        return None
    return q2_k_steps(layer.weight_scale.t().cpu())


def packed_tensor(layer: UPQLinear) -> tuple[np.ndarray, str]:
    """The GGUF blocks of a ``UPQLinear`` and their type name: ``"Q2_K"`` for SEQ INT2 on the Q2_K grid, ``"Q4_0"``
    for other SEQ INT2, ``"Q4_1"`` for INT4."""
    qw = layer.quantized_weight()
    group = layer.group_size or layer.in_features
    if qw.bits == 2:
        steps = _q2_k(layer)
        if steps is not None:
            return seq_to_q2_k(qw.codes.cpu(), *steps), "Q2_K"
        return seq_to_q4_0(qw.codes.cpu(), qw.scale.cpu(), group), "Q4_0"
    return int4_to_q4_1(qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu(), group), "Q4_1"


# ------------------------------------------------------------------------------------------------- model

def _permute_rows(index: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k: within each head, rows ``(2, d/2)`` become ``(d/2, 2)`` (its converter's
    ``LlamaModel.permute``), as an order of row indices."""
    rows = index.numel()
    return index.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def _dense(tensor: torch.Tensor, dense_type: str | None) -> tuple[np.ndarray, str]:
    kind = dense_type or {torch.bfloat16: "BF16", torch.float16: "F16"}.get(tensor.dtype, "F32")
    if tensor.dim() == 1:
        kind = "F32"  # norms and biases: llama.cpp reads them as F32
    if kind == "BF16":
        return tensor.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint8).reshape(
            *tensor.shape[:-1], -1), kind
    return tensor.detach().cpu().to(torch.float16 if kind == "F16" else torch.float32).numpy(), kind


def export_gguf(model: nn.Module | str | os.PathLike, out: str | os.PathLike, tokenizer=None, *,
                fallback: str = "error", dense_type: str | None = None) -> ExportReport:
    """Write ``model`` (a UPQ model, or the folder of a UPQ checkpoint) as the GGUF file ``out`` (see the module
    doc). ``tokenizer``: the model's (default: loaded from the checkpoint folder). ``fallback``: ``"error"``
    (a layer llama.cpp cannot hold exactly raises, naming it) or ``"dense"`` (written dense, listed in the report).
    ``dense_type``: the type of the dense tensors (default: their own dtype; ``"F16"``, ``"F32"``, ``"BF16"``).
    Written atomically. Returns an :class:`ExportReport`."""
    import gguf

    from .atomic import atomic_path

    if fallback not in ("error", "dense"):
        raise ValueError(f"fallback must be 'error' or 'dense', got {fallback!r}")
    if not isinstance(model, nn.Module):
        source = str(model)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ValueError(f"GGUF export knows the {sorted(set(ARCHITECTURES.values()))} architectures (transformers "
                         f"model_type {sorted(ARCHITECTURES)}), not {config.model_type!r}")
    if tokenizer is None:
        raise ValueError("GGUF export needs the model's tokenizer (pass tokenizer=, or export a checkpoint folder "
                         "that holds one)")
    report = ExportReport(str(out))
    tensors = _tensors(model, config, report, fallback, dense_type)
    with atomic_path(Path(out)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _metadata(writer, config, model)
        _tokenizer(writer, tokenizer, config)
        for name, (data, kind, shape) in tensors.items():
            # blocks and bf16 go in as bytes, (rows, bytes per row): the writer reads the logical shape from them
            raw = kind in ("Q2_K", "Q4_0", "Q4_1", "BF16")
            writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind) if raw else None)
            report.types[name] = kind
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    report.bytes = os.path.getsize(out)
    return report


def _tensors(model: nn.Module, config, report: ExportReport, fallback: str, dense_type: str | None) -> dict:
    """``{GGUF name: (data, type name, logical shape)}`` of every tensor, in model order."""
    import gguf

    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    modules = dict(model.named_modules())
    out = {}
    for name, tensor in _named_weights(model):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"GGUF export: no llama.cpp name for {name}")
        module = modules.get(name.rpartition(".")[0])
        rows = None
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = n_head if ".q_proj." in name else n_kv
            rows = _permute_rows(torch.arange(module.out_features if isinstance(module, UPQLinear)
                                              else tensor.shape[0]), heads)
        if isinstance(module, UPQLinear) and name.endswith(".weight"):
            why = _unexportable(module)
            if why is None:
                data, kind = packed_tensor(module)
                data = data if rows is None else data[rows.numpy()]
                out[gguf_name] = (data, kind, (module.out_features, module.in_features))
                continue
            if fallback == "error":
                raise ValueError(f"GGUF export: {name.rpartition('.')[0]} has {why}: no llama.cpp type holds it "
                                 f"exactly (fallback='dense' writes it dense instead)")
            report.fallbacks[name.rpartition(".")[0]] = why
            tensor = module.dequantize(torch.float32)
        if rows is not None:
            tensor = tensor[rows]
        data, kind = _dense(tensor, dense_type)
        out[gguf_name] = (data, kind, tuple(tensor.shape))
    return out


def _named_weights(model: nn.Module):
    """``(name, tensor)`` of what the GGUF holds: every parameter, and each quantized layer's weight (its packed
    codes stand for it); the output head only where it is not tied to the embedding."""
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    seen = set()
    for module_name, module in model.named_modules():
        if isinstance(module, UPQLinear):
            yield f"{module_name}.weight", module.weight
            if module.bias is not None:
                yield f"{module_name}.bias", module.bias
            seen.update(f"{module_name}.{leaf}" for leaf in ("weight", "bias"))
    for name, param in model.named_parameters():
        if name in seen or (tied and name == "lm_head.weight"):
            continue
        yield name, param


def _metadata(writer, config, model) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(str(getattr(config, "_name_or_path", "") or "upq model").split("/")[-1])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(2)  # MOSTLY_Q4_0: the block type of the quantized layers (INT4 ones are Q4_1)


def _tokenizer(writer, tokenizer, config) -> None:
    """A byte-level BPE tokenizer as llama.cpp's converter writes one (``get_vocab_base`` + ``SpecialVocab``)."""
    import tempfile

    import gguf

    vocab = tokenizer.get_vocab()
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    tokens, types = [], []
    for index in range(config.vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.USER_DEFINED)
            continue
        token = reverse[index]
        if token in added:
            special = getattr(decoder.get(index), "special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    name = str(getattr(tokenizer, "name_or_path", "") or getattr(config, "_name_or_path", "")).lower()
    writer.add_tokenizer_pre(next((pre for key, pre in PRE_TOKENIZERS.items() if key in name), "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads tokenizer.json / tokenizer_config.json
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
