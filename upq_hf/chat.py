"""Chat prompts and a model's answers to them: the one batched generator.

:func:`chat_prompt_ids` renders a single-turn prompt with the tokenizer's chat template, ready for the
assistant's answer. :func:`generate_answers` answers many prompts: prompts of similar length share a
batch (less padding), rows are left-padded, decoding is greedy unless ``do_sample`` (seeded, leaving the
global RNG alone), and each answer comes back as token ids up to and including its first end token
(the tokenizer's EOS or one of the model's generation-config EOS ids). The ``"self"`` data
(:mod:`upq_hf.data.self_data`) and the fidelity reference (:mod:`upq_hf.evaluation.fidelity`) both
generate with it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a single-turn chat prompt, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _contiguous_input(module, args):
    if args and torch.is_tensor(args[0]) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_head_input(model) -> None:
    """Make the output head's input contiguous (once per model). ``generate``'s first step hands the head the last
    position of every row, a strided view; for a bf16 head on a CPU, torch's ``F.linear`` then copies the whole
    weight once per row of the batch (0.2 GB a row for a 49,152 x 2,048 head), the largest memory peak of a
    streamed model's generation. A contiguous copy of the ``(batch, 1, hidden)`` input costs nothing."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_upq_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._upq_contiguous_input = True


def end_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
                     do_sample: bool = False, temperature: float | None = None, top_p: float | None = None,
                     seed: int = 0, progress: bool = False, desc: str = "answers") -> list[list[int]]:
    """``model``'s answers to ``prompts`` (in their order), each as token ids up to and including its
    first end token (:func:`end_token_ids`); at most ``max_new_tokens`` each. ``temperature`` and ``top_p``
    apply when ``do_sample``; sampling is seeded by ``seed``."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))  # similar lengths share a batch: less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    ends = end_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id, eos_token_id=ends,
        temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        top_k=None if not do_sample else 0,
    )
    device = next(model.parameters()).device
    contiguous_head_input(model)
    answers: list[list[int]] = [[] for _ in ids]
    was_training = model.training
    model.eval()
    produced, start = 0, time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(seed)
            bar = tqdm(batches, desc=desc, unit="batch", disable=not progress)
            for batch in bar:
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.tensor([[pad_id] * (width - len(ids[i])) + ids[i] for i in batch], device=device)
                attention = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch],
                                         device=device)
                out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_config)
                for i, row in zip(batch, out[:, width:].tolist()):
                    stop = next((k for k, token in enumerate(row) if token in ends), len(row) - 1)
                    answers[i] = row[:stop + 1]
                    produced += len(answers[i])
                bar.set_postfix(tok_s=f"{produced / max(time.perf_counter() - start, 1e-9):.0f}")
    finally:
        model.train(was_training)
    return answers
