"""Small models and data shared by the tests (imported explicitly: ``from helpers import tiny_llama``)."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=True)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen(seed: int = 0):
    """Qwen2 has biases on q/k/v: exercises the bias path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def random_blocks(n: int = 16, seqlen: int = 24, vocab: int = 128, seed: int = 0):
    """``n`` blocks of ``seqlen`` uniformly random token ids, as a Trainer dataset (``TokenBlockDataset``)."""
    from upq_hf.data import TokenBlockDataset

    generator = torch.Generator().manual_seed(seed)
    return TokenBlockDataset(torch.randint(0, vocab, (n, seqlen), generator=generator))
