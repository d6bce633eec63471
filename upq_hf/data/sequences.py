"""Tokenizing and packing: items (texts, conversations) into fixed-length token blocks.

``build_sequences(items, tokenizer, seqlen, nsamples, seed)`` tokenizes the items (conversations
through the tokenizer's chat template, plain texts with EOS appended), concatenates them in a
seed-shuffled order and cuts the stream into ``nsamples`` blocks of ``seqlen`` tokens (packing).
With ``return_loss_mask=True`` it also returns a mask that is True on the tokens a model should
learn to produce: plain text and assistant turns, not system/user turns nor chat headers.
``calibration_data`` composes :func:`upq_hf.data.sources.load_texts` and ``build_sequences``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

import torch

from .sources import Item, load_texts


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _conversation_spans(tokenizer, conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (the answer and the
    end-of-turn marker, not the header). Spans are found by rendering growing prefixes; a template
    for which a prefix does not render as a string prefix gets one span over the whole text."""
    text = _render(tokenizer, conversation)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, conversation[:i], add_generation_prompt=True) if i else ""
            upto = _render(tokenizer, conversation[:i + 1])
        except Exception:  # noqa: BLE001 - templates that reject partial conversations
            return text, [(0, len(text))]
        if not (text.startswith(upto) and upto.startswith(before)):
            return text, [(0, len(text))]
        spans.append((len(before), len(upto)))
    return text, spans


def _tokenize(items: Sequence[Item], tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(token ids, loss mask) per item; a mask is True on plain text and assistant turns."""
    eos = tokenizer.eos_token_id
    texts, spans = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            spans.append(None)
        else:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("the data holds conversations but the tokenizer has no chat template: use an "
                                 "instruction-tuned model's tokenizer, or plain texts")
            text, s = _conversation_spans(tokenizer, item)
            texts.append(text)
            spans.append(s)
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        enc = tokenizer(texts, add_special_tokens=False)
        offsets = None
    out = []
    for k, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        if spans[k] is None:
            mask = [True] * len(ids)
            if eos is not None:
                ids.append(eos)
                mask.append(True)
        elif offsets is None:
            mask = [True] * len(ids)
        else:
            mask = [any(a <= start < b for a, b in spans[k]) for start, _ in offsets[k]]
        out.append((ids, mask))
    return out


def build_sequences(items: Sequence[Item], tokenizer, seqlen: int, nsamples: int, seed: int = 0,
                    model_max_length: int | None = None, *, return_loss_mask: bool = False):
    """Pack ``items`` into a ``(nsamples, seqlen)`` LongTensor of token ids (and, with
    ``return_loss_mask``, a bool tensor of the same shape, True where the token is plain text or
    part of an assistant answer).

    The items are tokenized in a ``seed``-shuffled order and concatenated into one stream, which is
    cut into consecutive blocks. Deterministic for a seed. When the items hold fewer than
    ``nsamples * seqlen`` tokens, further passes over the items (each in a new seeded order) are
    appended, with a warning. ``model_max_length`` (the model's ``max_position_embeddings``) bounds
    ``seqlen``.
    """
    if seqlen <= 0 or nsamples <= 0:
        raise ValueError(f"seqlen and nsamples must be positive, got seqlen={seqlen}, nsamples={nsamples}")
    if model_max_length is not None and seqlen > model_max_length:
        raise ValueError(f"seqlen {seqlen} is longer than the model allows "
                         f"(max_position_embeddings {model_max_length})")
    items = list(items)
    need = nsamples * seqlen
    rng = random.Random(seed)
    tokenized: dict[int, tuple[list[int], list[bool]]] = {}
    ids: list[int] = []
    mask: list[bool] = []
    passes = 0
    chunk = 64
    while len(ids) < need:
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order), chunk):
            todo = [i for i in order[start:start + chunk] if i not in tokenized]
            if todo:
                tokenized.update(zip(todo, _tokenize([items[i] for i in todo], tokenizer)))
            for i in order[start:start + chunk]:
                ids.extend(tokenized[i][0])
                mask.extend(tokenized[i][1])
            if len(ids) >= need:
                break
        passes += 1
        if passes == 1 and len(ids) < need:
            if not ids:
                raise ValueError(f"no tokens in the {len(items)} texts: nothing to build sequences from")
            warnings.warn(
                f"the data holds {len(ids)} tokens in {len(items)} texts, fewer than nsamples x seqlen = "
                f"{nsamples} x {seqlen} = {need}: repeating it ({-(-need // len(ids))} passes, each reshuffled). "
                "Use more texts, or fewer/shorter samples.", stacklevel=2)
    input_ids = torch.tensor(ids[:need], dtype=torch.long).view(nsamples, seqlen)
    if return_loss_mask:
        return input_ids, torch.tensor(mask[:need], dtype=torch.bool).view(nsamples, seqlen)
    return input_ids


def calibration_data(source, tokenizer, model=None, *, nsamples: int, seqlen: int, seed: int = 0, **kw):
    """``build_sequences(load_texts(source, ...), ...)``: ``nsamples`` packed blocks of ``seqlen`` (no defaults
    here: ``UPQConfig`` holds them, ``nsamples=32, seqlen=128`` for calibration).

    ``model`` serves ``"self"`` and bounds ``seqlen`` by its ``max_position_embeddings`` (or pass
    ``model_max_length``); ``return_loss_mask=True`` returns ``(input_ids, loss_mask)``; other
    keywords go to ``load_texts``. ``seqlen`` is checked before any text is loaded or generated.
    """
    model_max_length = kw.pop("model_max_length", None)
    return_loss_mask = kw.pop("return_loss_mask", False)
    if model_max_length is None and model is not None and not isinstance(model, str):
        model_max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if model_max_length is not None and seqlen > model_max_length:
        raise ValueError(f"seqlen {seqlen} is longer than the model allows "
                         f"(max_position_embeddings {model_max_length})")
    items = load_texts(source, tokenizer=tokenizer, model=model, seed=seed, **kw)
    return build_sequences(items, tokenizer, seqlen, nsamples, seed=seed, model_max_length=model_max_length,
                           return_loss_mask=return_loss_mask)
