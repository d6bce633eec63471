"""Where calibration and training text comes from: ``load_texts(source, ...)``.

It returns a list of *items*; an item is a plain string or a conversation (a list of
``{"role", "content"}`` dicts). ``source`` is one of

* ``"self"``: the unquantized model's own answers to the built-in prompts (:mod:`upq_hf.data.self_data`);
* a local file: ``.txt`` (one text per paragraph, paragraphs separated by blank lines; line breaks
  inside a paragraph are kept), ``.jsonl`` (one JSON object per line) or ``.json`` (a list of
  objects), ``.parquet``; records give their text in ``text_field`` or else the first of ``text``,
  ``content``, ``messages``, ``conversations`` they have (a string is a text, a list of messages a
  conversation; ShareGPT's ``{"from", "value"}`` messages are accepted);
* a local folder: all such files below it (recursive, sorted by path, hidden names skipped);
* a Python list of strings and/or conversations;
* a Hub dataset id, with an optional config after a colon (``"wikitext:wikitext-2-raw-v1"``,
  ``"allenai/c4:en"``), streamed with ``datasets.load_dataset(..., streaming=True)``.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Union

from .self_data import self_generated

Conversation = list  # list[dict[str, str]] with "role" and "content"
Item = Union[str, Conversation]

BUILTIN_SOURCES = ("self",)
TEXT_FIELDS = ("text", "content", "messages", "conversations")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# a Hub stream is read only this far unless max_texts says otherwise (C4 has ~365M documents)
HUB_DEFAULT_MAX_TEXTS = 10_000

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
# load_texts
# ---------------------------------------------------------------------------------------------

def load_texts(source, *, tokenizer=None, model=None, split: str = "train", text_field: str | None = None,
               max_texts: int | None = None, seed: int = 0, **self_kwargs) -> list[Item]:
    """Texts and conversations from ``source`` (see the module docstring for what it may be).

    ``max_texts`` keeps at most that many items: a seed-chosen subset in original order for files
    and lists, the first ones of a Hub stream (default ``HUB_DEFAULT_MAX_TEXTS``), the first prompts
    for ``"self"`` (unless ``n_prompts`` is given). ``self_kwargs`` go to ``self_generated`` (``n_prompts``,
    ``prompts``, ``max_new_tokens``, ``batch_size``, ``cache``, ``progress``).
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
