"""Calibration and training text from anywhere, packed into fixed-length token blocks.

One module serves both stages of UPQ: block-wise PTQ calibration (``calibration_data``) and
distillation QAT (``TokenBlockDataset``). Two steps:

1. ``load_texts(source, ...)`` returns a list of *items*; an item is a plain string or a
   conversation (a list of ``{"role", "content"}`` dicts). ``source`` is one of

   * ``"self"``: the unquantized model's own answers to the built-in ``upq_hf.prompts.SEED_PROMPTS``
     (:func:`upq_hf.chat.generate_answers`), returned as conversations
     ``[user, assistant]``. Answers are cached as JSON under ``upq_hf.models.cache_dir() / "self_data"``
     in a file named by a hash of the model's name, a fingerprint of its weights and the generation
     settings, so a pipeline runs offline, reproducibly, and with no private data. The cache stores
     one answer per prompt: asking for more prompts later only generates the missing ones.
   * a local file: ``.txt`` (one text per paragraph, paragraphs separated by blank lines; line breaks
     inside a paragraph are kept), ``.jsonl`` (one JSON object per line) or ``.json`` (a list of
     objects), ``.parquet``; records give their text in ``text_field`` or else the first of ``text``,
     ``content``, ``messages``, ``conversations`` they have (a string is a text, a list of messages a
     conversation; ShareGPT's ``{"from", "value"}`` messages are accepted);
   * a local folder: all such files below it (recursive, sorted by path, hidden names skipped);
   * a Python list of strings and/or conversations;
   * a Hub dataset id, with an optional config after a colon (``"wikitext:wikitext-2-raw-v1"``,
     ``"allenai/c4:en"``), streamed with ``datasets.load_dataset(..., streaming=True)``.

2. ``build_sequences(items, tokenizer, seqlen, nsamples, seed)`` tokenizes the items (conversations
   through the tokenizer's chat template, plain texts with EOS appended), concatenates them in a
   seed-shuffled order and cuts the stream into ``nsamples`` blocks of ``seqlen`` tokens (packing).
   With ``return_loss_mask=True`` it also returns a mask that is True on the tokens a model should
   learn to produce: plain text and assistant turns, not system/user turns nor chat headers.

``calibration_data`` composes the two; ``TokenBlockDataset`` serves packed blocks to
``transformers.Trainer`` as ``{"input_ids", "attention_mask", "labels"}``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import torch

Conversation = list  # list[dict[str, str]] with "role" and "content"
Item = Union[str, Conversation]

BUILTIN_SOURCES = ("self",)
TEXT_FIELDS = ("text", "content", "messages", "conversations")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# a Hub stream is read only this far unless max_texts says otherwise (C4 has ~365M documents)
HUB_DEFAULT_MAX_TEXTS = 10_000

# "self" data defaults, sized for a CPU. Measured with the bundled 135M model on a 2-core CPU shared with
# other jobs (one torch thread, load average 4-7): 64 prompts x <=128 new tokens give 5.8k answer tokens
# (9.1k tokens with the chat template) in 140-185 s (batch 64-16); the default 128 prompts give 11.3k
# answer tokens (17.9k in all) in about 5 minutes at load 4, 9.7 minutes at load 7; seconds on a GPU.
# The cache makes every later call instant. Larger batches are faster on CPU too (fewer sequential steps).
SELF_DEFAULTS: dict[str, Any] = {
    "n_prompts": 128,
    "max_new_tokens": 128,
    "batch_size": 32,
    "do_sample": False,
    "temperature": 0.7,
    "top_p": 0.9,
    "cache": True,
    "progress": True,
}
_SELF_CACHE_VERSION = 1

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "bot": "assistant", "system": "system", "tool": "tool"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# ---------------------------------------------------------------------------------------------
# items
# ---------------------------------------------------------------------------------------------

def _to_item(value: Any) -> Item | None:
    """A text or a normalized conversation from one record value; None when it holds no text."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        conversation = []
        for message in value:
            if "role" in message and "content" in message:
                role, content = message["role"], message["content"]
            elif "from" in message and "value" in message:
                sender = str(message["from"])
                role, content = _SHAREGPT_ROLES.get(sender.lower(), sender), message["value"]
            else:
                return None
            if not isinstance(content, str):
                return None
            conversation.append({"role": str(role), "content": content})
        if any(m["content"].strip() for m in conversation):
            return conversation
    return None


def _record_item(record: Any, text_field: str | None) -> Item | None:
    if isinstance(record, str):
        return _to_item(record)
    if not isinstance(record, dict):
        return None
    if text_field is not None:
        return _to_item(record.get(text_field))
    for field in TEXT_FIELDS:
        if field in record:
            return _to_item(record[field])
    return None


def _subsample(items: list, max_texts: int | None, seed: int) -> list:
    """At most ``max_texts`` items: a seed-chosen subset, kept in their original order."""
    if max_texts is None or len(items) <= max_texts:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), max_texts))
    return [items[i] for i in keep]


# ---------------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------------

def _read_txt(path: Path) -> list[Item]:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return [p.strip("\n") for p in re.split(r"\n[ \t\r]*\n", text) if p.strip()]


def _read_jsonl(path: Path, text_field: str | None) -> list[Item]:
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            item = _record_item(record, text_field)
            if item is not None:
                items.append(item)
    return items


def _read_json(path: Path, text_field: str | None) -> list[Item]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"data": [...]}-style wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [item for item in (_record_item(r, text_field) for r in data) if item is not None]


def _read_parquet(path: Path, text_field: str | None) -> list[Item]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    fields = [text_field] if text_field is not None else [f for f in TEXT_FIELDS if f in names]
    if not fields or fields[0] not in names:
        wanted = text_field if text_field is not None else " / ".join(TEXT_FIELDS)
        raise ValueError(f"{path}: no column {wanted!r} (columns: {names}); pass text_field=")
    items = []
    for batch in pf.iter_batches(columns=fields[:1]):
        for value in batch.column(0).to_pylist():
            item = _to_item(value)
            if item is not None:
                items.append(item)
    return items


def _read_file(path: Path, text_field: str | None) -> list[Item]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".json":
        return _read_json(path, text_field)
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    raise ValueError(f"unsupported file type {path.suffix!r} for {path}: use one of {', '.join(FILE_SUFFIXES)}")


def _read_local(path: Path, text_field: str | None) -> list[Item]:
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*")
             if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no {'/'.join(FILE_SUFFIXES)} files")
        items = [item for f in files for item in _read_file(f, text_field)]
    else:
        items = _read_file(path, text_field)
    if not items:
        where = f" in field {text_field!r}" if text_field else ""
        raise ValueError(f"{str(path)!r} holds no usable text{where} (empty, or no {'/'.join(TEXT_FIELDS)} field)")
    return items


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~", "\\")) or os.path.splitext(source)[1].lower() in FILE_SUFFIXES
            or bool(re.match(r"^[A-Za-z]:[\\/]", source)))


# ---------------------------------------------------------------------------------------------
# Hub datasets
# ---------------------------------------------------------------------------------------------

def _unknown(source: str, reason: str) -> ValueError:
    hint = difflib.get_close_matches(source, BUILTIN_SOURCES, n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    return ValueError(
        f"unknown dataset {source!r}: not a local file/folder, not a built-in source "
        f"({', '.join(map(repr, BUILTIN_SOURCES))}), and the Hub could not provide it ({reason}){did_you_mean}"
    )


def _read_hub(source: str, split: str, text_field: str | None, max_texts: int | None) -> list[Item]:
    name, _, config = source.partition(":")
    if not _HUB_ID.match(name):
        raise _unknown(source, "not a valid Hub dataset id")
    import datasets

    limit = HUB_DEFAULT_MAX_TEXTS if max_texts is None else max_texts
    items: list[Item] = []
    try:
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        for record in stream:  # a stream resolves files lazily: network errors can surface here
            item = _record_item(record, text_field)
            if item is not None:
                items.append(item)
                if len(items) >= limit:
                    break
    except Exception as e:  # noqa: BLE001 - any failure of the Hub path becomes one clear error
        raise _unknown(source, f"{type(e).__name__}: {e}") from e
    if not items:
        wanted = text_field if text_field is not None else " / ".join(TEXT_FIELDS)
        raise ValueError(f"dataset {source!r} (split {split!r}) has no usable text in field {wanted!r}; "
                         "pass text_field=")
    return items


# ---------------------------------------------------------------------------------------------
# "self": the teacher's own answers to the seed prompts
# ---------------------------------------------------------------------------------------------

def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights: for every tensor of the state dict its name, shape,
    dtype, sum and a strided sample of values. Two checkpoints that differ anywhere in their
    weights almost surely get different fingerprints; reading them costs one pass over memory."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor):
                continue
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].to(device="cpu", dtype=torch.float64)
            total = flat.sum(dtype=torch.float64 if flat.is_floating_point() else torch.int64).item()
            h.update(sample.numpy().tobytes())
            h.update(repr(total).encode())
    return h.hexdigest()


def _model_name(model) -> str:
    return str(getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
               or type(model).__name__)


def self_cache_path(model, tokenizer, *, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                    seed: int) -> Path:
    """The JSON file holding ``model``'s answers for these generation settings."""
    from .models import cache_dir

    key = {
        "version": _SELF_CACHE_VERSION,
        "model": _model_name(model),
        "weights": weights_fingerprint(model),
        "chat_template": hashlib.sha256(str(getattr(tokenizer, "chat_template", "")).encode()).hexdigest(),
        "max_new_tokens": int(max_new_tokens),
        "do_sample": bool(do_sample),
    }
    if do_sample:
        key.update(temperature=float(temperature), top_p=float(top_p), seed=int(seed))
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
    from .atomic import write_text

    write_text(path, json.dumps({"version": _SELF_CACHE_VERSION, **meta, "answers": answers}, ensure_ascii=False,
                                indent=1))


def self_generated(model, tokenizer, *, prompts: Sequence[str] | None = None, n_prompts: int | None = None,
                   max_new_tokens: int = SELF_DEFAULTS["max_new_tokens"], batch_size: int = SELF_DEFAULTS["batch_size"],
                   do_sample: bool = SELF_DEFAULTS["do_sample"], temperature: float = SELF_DEFAULTS["temperature"],
                   top_p: float = SELF_DEFAULTS["top_p"], seed: int = 0, cache: bool = SELF_DEFAULTS["cache"],
                   progress: bool = SELF_DEFAULTS["progress"]) -> list[Conversation]:
    """``[user, assistant]`` conversations: ``model``'s answers (greedy by default) to the first
    ``n_prompts`` of ``prompts`` (default ``SEED_PROMPTS``, 128 of them), cached on disk per prompt."""
    from .prompts import SEED_PROMPTS

    if model is None or tokenizer is None:
        raise ValueError("source 'self' needs the unquantized model and its tokenizer: "
                         "load_texts('self', model=model, tokenizer=tokenizer)")
    if isinstance(model, str):
        from .models import load_model

        model = load_model(model)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("source 'self' needs a tokenizer with a chat template (an instruction-tuned model's)")
    prompts = list(SEED_PROMPTS if prompts is None else prompts)
    if n_prompts is None:
        n_prompts = SELF_DEFAULTS["n_prompts"] if len(prompts) > SELF_DEFAULTS["n_prompts"] else len(prompts)
    if n_prompts <= 0 or max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"n_prompts, max_new_tokens and batch_size must be positive, got "
                         f"{n_prompts}, {max_new_tokens}, {batch_size}")
    if n_prompts > len(prompts):
        warnings.warn(f"asked for {n_prompts} prompts but only {len(prompts)} exist; using all of them", stacklevel=3)
    prompts = prompts[:n_prompts]
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
    path = self_cache_path(model, tokenizer, **settings) if cache else None
    answers = _read_cache(path) if path is not None else {}
    missing = list(dict.fromkeys(p for p in prompts if p not in answers))
    if missing:
        from .chat import generate_answers

        new = [tokenizer.decode(ids, skip_special_tokens=True).strip()
               for ids in generate_answers(model, tokenizer, missing, batch_size=batch_size, progress=progress,
                                           desc="self data: generating", **settings)]
        answers.update(zip(missing, new))
        if path is not None:
            _write_cache(path, answers, {"model": _model_name(model), "settings": settings})
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": answers[p]}] for p in prompts]


# ---------------------------------------------------------------------------------------------
# load_texts
# ---------------------------------------------------------------------------------------------

def load_texts(source, *, tokenizer=None, model=None, split: str = "train", text_field: str | None = None,
               max_texts: int | None = None, seed: int = 0, **self_kwargs) -> list[Item]:
    """Texts and conversations from ``source`` (see the module docstring for what it may be).

    ``max_texts`` keeps at most that many items: a seed-chosen subset in original order for files
    and lists, the first ones of a Hub stream (default ``HUB_DEFAULT_MAX_TEXTS``), the first prompts
    for ``"self"`` (unless ``n_prompts`` is given). ``seed`` also seeds sampled ``"self"`` generation.
    ``self_kwargs`` go to ``self_generated`` (``n_prompts``, ``prompts``, ``max_new_tokens``,
    ``batch_size``, ``do_sample``, ``temperature``, ``top_p``, ``cache``, ``progress``).
    """
    if max_texts is not None and max_texts <= 0:
        raise ValueError(f"max_texts must be positive, got {max_texts}")
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        if max_texts is not None:
            self_kwargs.setdefault("n_prompts", max_texts)
        return self_generated(model, tokenizer, seed=seed, **self_kwargs)
    if self_kwargs:
        raise TypeError(f"unexpected keyword arguments {sorted(self_kwargs)} (they apply to source 'self' only)")
    if isinstance(source, (list, tuple)):
        if source and all(isinstance(v, dict) and "role" in v for v in source):
            source = [source]  # one bare conversation
        items = []
        for k, value in enumerate(source):
            item = _record_item(value, text_field) if isinstance(value, dict) else _to_item(value)
            if item is None and not isinstance(value, (str, dict)):
                raise ValueError(f"item {k} of the list is neither a string nor a list of {{'role', 'content'}} "
                                 f"messages: {str(value)[:80]!r}")
            if item is not None:
                items.append(item)
        if not items:
            raise ValueError("the list of texts holds no usable text")
        return _subsample(items, max_texts, seed)
    if isinstance(source, os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data source {str(source)!r} does not exist")
        return _subsample(_read_local(path, text_field), max_texts, seed)
    if not isinstance(source, str):
        raise TypeError(f"data source must be a name, a path or a list of texts, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.exists():
        return _subsample(_read_local(path, text_field), max_texts, seed)
    if _looks_like_path(source):
        raise FileNotFoundError(f"data source {source!r} does not exist (no such file or folder)")
    return _read_hub(source, split, text_field, max_texts)


# ---------------------------------------------------------------------------------------------
# tokenization and packing
# ---------------------------------------------------------------------------------------------

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


def calibration_data(source, tokenizer, model=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0, **kw):
    """``build_sequences(load_texts(source, ...), ...)``: ``nsamples`` packed blocks of ``seqlen``.

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


class TokenBlockDataset(torch.utils.data.Dataset):
    """Packed token blocks for ``transformers.Trainer``: each item is ``{"input_ids",
    "attention_mask", "labels"}`` (1-D LongTensors of the block length). ``labels`` are the input ids
    (the model shifts them), set to -100 where ``loss_mask`` is False."""

    def __init__(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor (nsamples, seqlen)")
        if loss_mask is not None and loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        self.input_ids = input_ids.long()
        self.loss_mask = None if loss_mask is None else loss_mask.bool()

    @classmethod
    def from_source(cls, source, tokenizer, model=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                    assistant_only_loss: bool = False, **kw) -> "TokenBlockDataset":
        """Load, pack and wrap in one call; ``assistant_only_loss`` masks system/user tokens out of ``labels``."""
        input_ids, loss_mask = calibration_data(source, tokenizer, model=model, nsamples=nsamples, seqlen=seqlen,
                                                seed=seed, return_loss_mask=True, **kw)
        return cls(input_ids, loss_mask if assistant_only_loss else None)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        labels = ids.clone()
        if self.loss_mask is not None:
            labels[~self.loss_mask[index]] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


__all__ = [
    "BUILTIN_SOURCES", "SELF_DEFAULTS", "HUB_DEFAULT_MAX_TEXTS", "TokenBlockDataset", "build_sequences",
    "calibration_data", "load_texts", "self_cache_path", "self_generated", "weights_fingerprint",
]
