"""Native decode: the whole decoder stack of a Llama-style model in one C++ call per token.

On a small model the Python forward of transformers, not the INT2 kernel, is most of a decode step: 30 layers of
seven linear calls, norms, rope and attention, each a Python call and a dispatch (docs/BENCHMARKS.md, "A faster
decode loop in transformers"). :class:`NativeDecoder` hands the model's tensors once to ``upq_hf/csrc/upq_decode.cpp``
(by reference: nothing is copied but the norm weights and the rope tables), keeps an fp32 KV cache there, and runs a
step (the prompt, or one new token) in one call; the output head stays the model's own module (the ``a8`` backend's
int8 head where that is chosen), called once a step.

    from upq_hf.native import NativeDecoder
    decoder = NativeDecoder(model)                 # Llama, Mistral, Qwen2, Qwen3 (dense) on the CPU
    ids = decoder.generate(input_ids, max_new_tokens=64)

Arithmetic: fp32 throughout (the model's bf16 or fp32 weights widened), the UPQ layers on upq_hf's CPU kernel,
exact, or with int8 activations (``int8_activations=True``, or the model's / ``UPQ_BACKEND``'s ``a8`` choice: not
exact, see :mod:`upq_hf.backends`); layers the kernel does not read (dense ones, other formats) a dense fp32 product.
So its logits equal the model's own fp32 forward up to the order of fp32 sums (tested: ``tests/test_native.py``),
not bit for bit. Greedy or sampled decoding of one sequence; ``transformers``' ``generate`` stays the path for
everything else (beams, batches, logits processors), and for the families this does not run.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from . import avx2
from .backends import ENV
from .nn import UPQLinear

#: ``config.model_type`` of the families the native step runs (pre-norm RMSNorm blocks, rotate-half rope, SiLU MLP)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
#: rows of a prompt run in one call
CHUNK = 128


def native_problem(model) -> str | None:
    """Why :class:`NativeDecoder` cannot run ``model``, or None when it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"native decode runs the {', '.join(FAMILIES)} families, not {kind!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"native decode runs SiLU MLPs, not {config.hidden_act!r}"
    if avx2.kernel() is None:
        return f"native decode needs upq_hf's CPU kernel: {avx2.unavailable_reason()}"
    reason = avx2.load_decoder()
    if reason is not None:
        return f"native decode needs its C++ operators: {reason}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "rotary_emb", None) is None:
        return "native decode needs model.model.layers and model.model.rotary_emb"
    if "dynamic" in str(getattr(inner.rotary_emb, "rope_type", "")):
        return "native decode precomputes rope tables: dynamic rope scaling is not supported"
    for index, layer in enumerate(layers):
        for parent, name in _LINEARS:
            module = getattr(getattr(layer, parent, None), name, None)
            if type(module) not in (nn.Linear, UPQLinear):
                return (f"layer {index}'s {parent}.{name} is {type(module).__name__}: native decode runs plain "
                        "nn.Linear and UPQLinear layers (merge or unload adapters first)")
            if module.weight.device.type != "cpu":
                return f"native decode runs on the CPU; layer {index}'s {parent}.{name} is on {module.weight.device}"
    return None


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _linear(module) -> tuple[list, list[int]]:
    """(codes, scale, zero, bias, dense) and (bits, group, K, N) of one layer, as upq_decode.cpp takes them."""
    bias = None if module.bias is None else module.bias.detach()
    if isinstance(module, UPQLinear) and avx2.supports(module) and module.weight_scale.dtype in avx2._DTYPES:
        if bias is not None and bias.dtype not in avx2._DTYPES:
            bias = bias.float()
        return ([module.weight, module.weight_scale.detach(), None if module.weight_zero is None else
                 module.weight_zero.detach(), bias, None],
                [module.bits, module.group_size or module.in_features, module.in_features, module.out_features])
    dense = module.dequantize(torch.float32) if isinstance(module, UPQLinear) else module.weight.detach().float()
    return [None, None, None, None if bias is None else bias.float(), dense.contiguous()], \
        [0, 0, module.in_features, module.out_features]


def wants_int8(model) -> bool:
    """The ``a8`` choice of the model's UPQ layers (their backend, else ``UPQ_BACKEND``), where this CPU runs it."""
    chosen = {m.backend for m in model.modules() if isinstance(m, UPQLinear)}
    choice = next(iter(chosen - {None}), None) or os.environ.get(ENV)
    return choice == "a8" and avx2.has_a8()


class NativeDecoder:
    """One sequence's decoder for ``model`` (see the module docstring). ``max_length``: the KV cache's positions
    (default: the model's ``max_position_embeddings``, at most 4,096; :meth:`generate` makes a bigger one when a call
    needs it). ``int8_activations``: None follows the model's backend choice (:func:`wants_int8`). The decoder holds
    the model's tensors as they were when it was made: after changing the model (merging adapters, loading other
    weights, moving it) make a new one."""

    def __init__(self, model, max_length: int | None = None, int8_activations: bool | None = None):
        problem = native_problem(model)
        if problem is not None:
            raise ValueError(problem)
        self.model = model
        self.int8_activations = wants_int8(model) if int8_activations is None else bool(int8_activations)
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_length = int(max_length or min(limit, 4096))
        self.handle = None
        self.position = 0
        #: the last :meth:`generate`'s prompt tokens and seconds, new tokens and seconds (the first new token's
        #: logits come with the prompt's call; each later one costs a step)
        self.timings: dict = {}
        self._build()

    def _build(self) -> None:
        model, config = self.model, self.model.config
        inner = model.model
        first = inner.layers[0].self_attn
        head_dim = first.head_dim
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        with torch.no_grad():
            positions = torch.arange(self.max_length)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        tensors = [inner.norm.weight.detach(), cos[0].float().contiguous(), sin[0].float().contiguous()]
        ints = [config.hidden_size, heads, kv_heads, head_dim, config.intermediate_size, self.max_length,
                len(inner.layers)]
        for layer in inner.layers:
            attention = layer.self_attn
            tensors += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                        getattr(getattr(attention, "q_norm", None), "weight", None),
                        getattr(getattr(attention, "k_norm", None), "weight", None)]
            # Qwen2/Qwen3 name it per layer (None on full-attention layers); Mistral's every layer takes the config's
            window = (getattr(attention, "sliding_window", None) if hasattr(attention, "sliding_window") else
                      getattr(config, "sliding_window", None) if config.model_type == "mistral" else None)
            ints.append(int(window) if window else 0)
            for parent, name in _LINEARS:
                t, i = _linear(getattr(getattr(layer, parent), name))
                tensors += t
                ints += i
        self._free()
        self.handle = torch.ops.upq_cpu.decoder_new([None if t is None else t.detach() for t in tensors], ints,
                                                    _eps(inner.norm), float(first.scaling))
        self.position = 0

    def _free(self) -> None:
        if self.handle is not None:
            torch.ops.upq_cpu.decoder_free(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self._free()
        except Exception:  # noqa: BLE001 - at interpreter exit the op may be gone
            pass

    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten from position 0)."""
        self.position = 0

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, last: int = 1) -> torch.Tensor:
        """Feed ``ids`` (1-D, the next tokens of the sequence) and return the logits (fp32) of the last ``last`` of
        them (all of them when ``last`` is 0)."""
        ids = ids.reshape(-1)
        if self.position + ids.numel() > self.max_length:
            raise ValueError(f"the sequence would reach {self.position + ids.numel()} positions; this decoder's cache "
                             f"holds {self.max_length} (NativeDecoder(model, max_length=...))")
        embeddings = self.model.get_input_embeddings()
        total = ids.numel()
        first_kept = 0 if last == 0 else max(0, total - last)
        hidden = []
        for start in range(0, total, CHUNK):
            chunk = ids[start:start + CHUNK]
            end = start + chunk.numel()
            keep = max(0, end - max(start, first_kept))
            x = embeddings(chunk.to(embeddings.weight.device)).float()
            out = torch.ops.upq_cpu.decoder_step(self.handle, x, self.position, self.int8_activations, max(keep, 1))
            self.position += chunk.numel()
            if keep:
                hidden.append(out[-keep:])
        head = self.model.get_output_embeddings()
        h = torch.cat(hidden)
        return head(h.to(head.weight.dtype)).float()

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 64, eos_token_id=None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, streamer=None) -> torch.Tensor:
        """The prompt ``input_ids`` (shape (1, T) or (T,)) followed by up to ``max_new_tokens`` new tokens, as
        ``model.generate`` returns them for one sequence (greedy unless ``do_sample``); stops after an end token
        (``eos_token_id``, default the model's generation config). Sampling: ``temperature``, then ``top_k`` (0: all)
        and ``top_p``. ``streamer``: a transformers streamer (``put``, ``end``)."""
        ids = torch.as_tensor(input_ids).reshape(1, -1) if not torch.is_tensor(input_ids) or input_ids.dim() < 2 \
            else input_ids
        if ids.shape[0] != 1:
            raise ValueError(f"NativeDecoder.generate decodes one sequence, got a batch of {ids.shape[0]}; use "
                             "model.generate for batches")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        needed = ids.shape[1] + max_new_tokens
        if needed > self.max_length:
            self.max_length = needed
            self._build()
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else
                    [] if eos_token_id is None else [eos_token_id])
        self.reset()
        started = time.perf_counter()
        out = [int(t) for t in ids[0]]
        if streamer is not None:
            streamer.put(ids.cpu())
        if max_new_tokens == 0:
            return ids.clone()
        logits = self.forward(ids[0])[-1]
        prompt_s = time.perf_counter() - started
        for step in range(max_new_tokens):
            token = _pick(logits, do_sample, temperature, top_p, generator, top_k)
            out.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in stops or step == max_new_tokens - 1:
                break
            logits = self.forward(torch.tensor([token]))[-1]
        if streamer is not None:
            streamer.end()
        self.timings = {"prompt_tokens": ids.shape[1], "prompt_s": prompt_s, "new_tokens": len(out) - ids.shape[1],
                        "decode_s": time.perf_counter() - started - prompt_s}
        return torch.tensor([out], dtype=ids.dtype if ids.dtype != torch.float32 else torch.long)


def _pick(logits: torch.Tensor, sample: bool, temperature: float, top_p: float, generator, top_k: int = 0) -> int:
    if not sample:
        return int(torch.argmax(logits))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


#: ``generate`` arguments the native path takes (:func:`install`); any other sends the call to transformers
_NATIVE_ARGS = {"input_ids", "inputs", "attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature",
                "top_p", "top_k", "eos_token_id", "pad_token_id", "streamer", "use_cache", "bos_token_id"}
#: generation settings that must keep their neutral values for the native path
_NEUTRAL = {"num_beams": (None, 1), "num_return_sequences": (None, 1), "repetition_penalty": (None, 1.0),
            "min_new_tokens": (None, 0), "min_length": (None, 0), "no_repeat_ngram_size": (None, 0),
            "return_dict_in_generate": (None, False), "output_scores": (None, False), "output_logits": (None, False),
            "penalty_alpha": (None,), "guidance_scale": (None, 1.0), "num_beam_groups": (None, 1),
            "prompt_lookup_num_tokens": (None,), "max_time": (None,), "stop_strings": (None,),
            "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
            "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "typical_p": (None, 1.0),
            "min_p": (None,), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0)}


def install(model, max_length: int | None = None, int8_activations: bool | None = None):
    """Route ``model.generate`` through a :class:`NativeDecoder` where a call allows it: one sequence (no padding),
    greedy or sampled (temperature, top-k, top-p), stopping at ``max_new_tokens``/``max_length`` or an end token, the
    output ids returned as a tensor; every other call (batches, beams, penalties, logits processors, dict outputs, a
    ``generation_config`` argument) goes to transformers' own ``generate`` unchanged. Returns ``model``; a ``ValueError``
    says why where the model cannot run natively (:func:`native_problem`). :func:`uninstall` undoes it."""
    decoder = NativeDecoder(model, max_length=max_length, int8_activations=int8_activations)
    original = model.generate

    def generate(*args, **kwargs):
        call = _native_call(model, args, kwargs)
        if call is None:
            return original(*args, **kwargs)
        return decoder.generate(**call)

    generate.__doc__ = original.__doc__
    generate.native_decoder = decoder
    model.generate = generate
    return model


def uninstall(model):
    """Undo :func:`install`."""
    if getattr(model.__dict__.get("generate"), "native_decoder", None) is not None:
        del model.__dict__["generate"]
    return model


def _native_call(model, args: tuple, kwargs: dict) -> dict | None:
    """The :meth:`NativeDecoder.generate` arguments for a ``generate`` call, or None where the call needs
    transformers' own."""
    if len(args) > 1 or any(key not in _NATIVE_ARGS for key in kwargs):
        return None
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] != 1 or ids.device.type != "cpu":
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(torch.all(mask == 1)):
        return None
    config = getattr(model, "generation_config", None)

    def setting(name, default=None):
        value = kwargs.get(name, getattr(config, name, None))
        return default if value is None else value

    for name, neutral in _NEUTRAL.items():
        if getattr(config, name, None) not in neutral:
            return None
    if getattr(config, "use_cache", True) is False or kwargs.get("use_cache", True) is False:
        return None
    if "max_new_tokens" in kwargs or getattr(config, "max_new_tokens", None) is not None:
        new = setting("max_new_tokens")
    else:
        new = setting("max_length", 20) - ids.shape[1]
    sample = bool(setting("do_sample", False))
    return dict(input_ids=ids, max_new_tokens=max(int(new), 0), eos_token_id=setting("eos_token_id"),
                do_sample=sample, temperature=float(setting("temperature", 1.0)), top_p=float(setting("top_p", 1.0)),
                top_k=int(setting("top_k", 0)) if sample else 0, streamer=kwargs.get("streamer"))
