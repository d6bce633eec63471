"""``"self"`` data: the unquantized model's own answers to the built-in prompts, cached on disk.

The model answers the built-in ``upq_hf.prompts.SEED_PROMPTS`` (greedy by default, through
:func:`upq_hf.chat.generate_answers`); the answers come back as conversations ``[user, assistant]``.
They are cached as JSON under ``upq_hf.models.cache_dir() / "self_data"`` in a file named by a hash of
the model's name, a fingerprint of its weights and the generation settings, so a pipeline runs
offline, reproducibly, and with no private data. The cache stores one answer per prompt: asking for
more prompts later only generates the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..chat import generate_answers

# "self" data defaults, sized for a CPU: the bundled 135M model answers all 331 built-in prompts in about 4
# minutes on two cores, seconds on a GPU (docs/BENCHMARKS.md); the cache makes every later call instant. Larger
# batches are faster on a CPU too (fewer sequential steps). Every prompt is answered unless n_prompts says
# otherwise (since 2026-12-06: 2.5x the distinct distillation data measured ahead of 128 prompts,
# docs/BENCHMARKS.md).
SELF_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128,
    "batch_size": 32,
    "cache": True,
    "progress": True,
}
_SELF_CACHE_VERSION = 1
# the temperature of the sampled answers ``sampled`` adds beside the greedy ones (no top-p: its full-vocabulary sort
# per step cost a third of a generation's time, docs/BENCHMARKS.md)
SAMPLE_TEMPERATURE = 0.7


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights: for every tensor of the state dict its name, shape,
    dtype, sum and a strided sample of values. Two checkpoints that differ anywhere in their
    weights almost surely get different fingerprints; reading them costs one pass over memory."""
    h = hashlib.sha256()
    store = getattr(model, "_upq_block_store", None)  # a skeleton whose blocks stay on disk (upq_hf.offload)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor):
                continue
            if tensor.device.type == "meta" and store is not None and name in store.index:
                tensor = store.read(name)  # one tensor at a time: the fingerprint of the model as loaded
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].to(device="cpu", dtype=torch.float64)
            # summed in slices: a sum in float64 of the whole tensor would copy it into float64 first
            total = sum(chunk.sum(dtype=torch.float64 if flat.is_floating_point() else torch.int64).item()
                        for chunk in flat.split(1 << 22))
            h.update(sample.numpy().tobytes())
            h.update(repr(total).encode())
    return h.hexdigest()


def _model_name(model) -> str:
    return str(getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
               or type(model).__name__)


def self_cache_path(model, tokenizer, *, max_new_tokens: int, draw: int = 0) -> Path:
    """The JSON file holding ``model``'s answers of at most ``max_new_tokens`` tokens: greedy ones (``draw`` 0), or
    the ``draw``-th set of answers sampled at ``SAMPLE_TEMPERATURE`` (seeded by ``draw``)."""
    from ..models import cache_dir

    key = {
        "version": _SELF_CACHE_VERSION,
        "model": _model_name(model),
        "weights": weights_fingerprint(model),
        "chat_template": hashlib.sha256(str(getattr(tokenizer, "chat_template", "")).encode()).hexdigest(),
        "max_new_tokens": int(max_new_tokens),
        "do_sample": False,  # greedy answers (sampled ones measured worse as training data): the key of old caches
    }
    if draw:
        key.update(do_sample=True, temperature=SAMPLE_TEMPERATURE, draw=int(draw))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = re.sub(r"[^\w.\-]+", "_", Path(key["model"].rstrip("/\\")).name or "model")[:60]
    return cache_dir() / "self_data" / f"{stem}-{digest}.json"


def _read_cache(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") == _SELF_CACHE_VERSION and isinstance(data.get("answers"), dict):
            return {str(k): str(v) for k, v in data["answers"].items()}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable self-data cache {path} ({e}); regenerating", stacklevel=3)
    return {}


def _write_cache(path: Path, answers: dict[str, str], meta: dict) -> None:
    from ..atomic import write_text

    write_text(path, json.dumps({"version": _SELF_CACHE_VERSION, **meta, "answers": answers}, ensure_ascii=False,
                                indent=1))


def self_generated(model, tokenizer, *, prompts: Sequence[str] | None = None, n_prompts: int | None = None,
                   max_new_tokens: int = SELF_DEFAULTS["max_new_tokens"], batch_size: int = SELF_DEFAULTS["batch_size"],
                   cache: bool = SELF_DEFAULTS["cache"], progress: bool = SELF_DEFAULTS["progress"],
                   sampled: int = 0, seed: int = 0) -> list[list[dict[str, str]]]:
    """``[user, assistant]`` conversations: ``model``'s greedy answers to the first ``n_prompts`` of ``prompts``
    (default ``SEED_PROMPTS``, all 331 of them), cached on disk per prompt. ``sampled``: that many further
    answers to each prompt, sampled at ``SAMPLE_TEMPERATURE`` (draw ``k`` seeded by ``k``, each cached on its own),
    after the greedy ones. (Sampled answers instead of greedy ones measured worse as Distill-QAT data,
    docs/BENCHMARKS.md; ``seed`` is accepted for the other sources' sake.)"""
    from ..prompts import SEED_PROMPTS

    if model is None or tokenizer is None:
        raise ValueError("source 'self' needs the unquantized model and its tokenizer: "
                         "load_texts('self', model=model, tokenizer=tokenizer)")
    if isinstance(model, str):
        from ..models import load_model

        model = load_model(model)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("source 'self' needs a tokenizer with a chat template (an instruction-tuned model's)")
    prompts = list(SEED_PROMPTS if prompts is None else prompts)
    if n_prompts is None:
        n_prompts = len(prompts)
    if n_prompts <= 0 or max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"n_prompts, max_new_tokens and batch_size must be positive, got "
                         f"{n_prompts}, {max_new_tokens}, {batch_size}")
    if isinstance(sampled, bool) or not isinstance(sampled, int) or sampled < 0:
        raise ValueError(f"sampled must be a whole number of answers per prompt (0: the greedy ones alone), "
                         f"got {sampled!r}")
    if n_prompts > len(prompts):
        warnings.warn(f"asked for {n_prompts} prompts but only {len(prompts)} exist; using all of them", stacklevel=3)
    prompts = prompts[:n_prompts]
    out = []
    for draw in range(sampled + 1):
        answers = _answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           cache=cache, progress=progress, draw=draw)
        out += [[{"role": "user", "content": p}, {"role": "assistant", "content": answers[p]}] for p in prompts]
    return out


def _answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, cache: bool,
             progress: bool, draw: int) -> dict[str, str]:
    """``model``'s answers to ``prompts`` by prompt, greedy (``draw`` 0) or sampled, from the cache where it
    has them."""
    settings = dict(max_new_tokens=max_new_tokens)
    path = self_cache_path(model, tokenizer, **settings, draw=draw) if cache else None
    answers = _read_cache(path) if path is not None else {}
    missing = list(dict.fromkeys(p for p in prompts if p not in answers))
    if missing:
        sampling = dict(do_sample=True, temperature=SAMPLE_TEMPERATURE, seed=draw) if draw else {}
        desc = f"self data: sampling (draw {draw})" if draw else "self data: generating"
        new = [tokenizer.decode(ids, skip_special_tokens=True).strip()
               for ids in generate_answers(model, tokenizer, missing, batch_size=batch_size, progress=progress,
                                           desc=desc, **settings, **sampling)]
        answers.update(zip(missing, new))
        if path is not None:
            _write_cache(path, answers, {"model": _model_name(model), "settings": {**settings, **sampling}})
    return answers
