"""Whether a model's answers are on the subject of their prompts, judged by the unquantized teacher.

For answers ``a_1..a_n`` to prompts ``p_1..p_n`` the teacher scores every pairing: ``scores[i, j]`` is the
mean log-probability of ``a_i``'s tokens after the chat prompt ``p_j``. Answer ``i`` is *on topic* when its
own prompt scores highest: reading ``a_i``, the teacher would pick ``p_i`` out of all ``n`` prompts as the
one it answers. A wrong fact about the right subject stays on topic ("Cleopatra was a goddess"), and so
does a loop about it; an answer that drifts to another subject, byte-token garbage and an empty answer do
not. It needs no judge model and no network: the teacher is the model the fidelity numbers load anyway.
The prompts should be about different things (the held-out prompts are), or two of them compete for the
same answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..chat import chat_prompt_ids


@torch.no_grad()
def pairing_scores(teacher, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 16) -> torch.Tensor:
    """``(n, n)`` float64: the teacher's mean log-probability of answer ``i``'s tokens after prompt ``j``;
    ``-inf`` rows for empty answers."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] if a else [] for a in answers]
    n = len(prompts)
    scores = torch.full((n, n), float("-inf"), dtype=torch.float64)
    pairs = [(i, j) for i in range(n) if answer_ids[i] for j in range(n)]
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            seqs = [prompt_ids[j] + answer_ids[i] for i, j in batch]
            width = max(map(len, seqs))
            input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
            attention = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, seq in enumerate(seqs):
                input_ids[row, :len(seq)] = torch.tensor(seq)
                attention[row, :len(seq)] = 1
            logits = teacher(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            for row, (i, j) in enumerate(batch):
                first = len(prompt_ids[j])  # the answer's tokens are predicted from positions first-1 .. end-2
                targets = torch.tensor(answer_ids[i], device=logits.device)
                log_probs = torch.log_softmax(logits[row, first - 1:first - 1 + len(targets)], dim=-1)
                scores[i, j] = float(log_probs.gather(1, targets[:, None]).mean())
    finally:
        teacher.train(was_training)
    return scores


def topicality(teacher, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16) -> dict:
    """``{"on_topic": count, "answers": n, "ranks": [...]}``: the rank of each answer's own prompt among all
    prompts by :func:`pairing_scores` (1: on topic; ties count against it; ``n`` for an empty answer)."""
    scores = pairing_scores(teacher, tokenizer, prompts, answers, batch_size=batch_size)
    n = len(prompts)
    ranks = []
    for i in range(n):
        own = scores[i, i]
        ranks.append(n if own == float("-inf") else int((scores[i] >= own).sum()))
    return {"on_topic": sum(rank == 1 for rank in ranks), "answers": n, "ranks": ranks}
