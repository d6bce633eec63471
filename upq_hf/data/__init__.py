"""Calibration and training text from anywhere, packed into fixed-length token blocks.

One package serves both stages of UPQ: block-wise PTQ calibration (``calibration_data``) and
distillation QAT (``TokenBlockDataset``). The data path, one module a step:

1. :mod:`.sources`: ``load_texts(source, ...)``, a list of texts and conversations from local files,
   a Python list, a Hub dataset (streamed), or ``"self"``;
2. :mod:`.self_data`: ``"self"``, the unquantized model's own answers to the built-in prompts, cached
   on disk per model, weights and generation settings;
3. :mod:`.sequences`: ``build_sequences`` tokenizes (chat template for conversations, EOS after plain
   texts) and packs them into ``(nsamples, seqlen)`` blocks with an optional loss mask;
   ``calibration_data`` composes steps 1 and 3;
4. :mod:`.dataset`: ``TokenBlockDataset`` serves packed blocks to ``transformers.Trainer`` as
   ``{"input_ids", "attention_mask", "labels"}``.
"""

from .dataset import TokenBlockDataset
from .self_data import SELF_DEFAULTS, self_cache_path, self_generated, weights_fingerprint
from .sequences import build_sequences, calibration_data
from .sources import BUILTIN_SOURCES, HUB_DEFAULT_MAX_TEXTS, Conversation, Item, load_texts

__all__ = [
    "BUILTIN_SOURCES", "SELF_DEFAULTS", "HUB_DEFAULT_MAX_TEXTS", "TokenBlockDataset", "build_sequences",
    "calibration_data", "load_texts", "self_cache_path", "self_generated", "weights_fingerprint",
    "Conversation", "Item",
]
