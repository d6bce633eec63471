"""Offline fidelity of a quantized model to its unquantized teacher: the one fidelity run.

The teacher answers a set of held-out chat prompts greedily (:func:`upq_hf.chat.generate_answers`);
both models are then run teacher-forced on ``prompt + teacher answer`` and compared on the answer
tokens only:

* ``top1``: how often the student's most likely next token is the teacher's;
* ``kl``: mean per-token KL(teacher || student) in nats;
* ``jsd``: mean per-token Jensen-Shannon divergence (beta = 0.5) in nats.

With ``answers=True`` the student also answers the prompts freely (greedy), and the teacher says how many
of those answers are on their prompt's subject (:mod:`.topicality`).

KL and JSD are :func:`upq_hf.distill.generalized_jsd` (beta 0 and 0.5), the divergence the INT2
stage trains on. :func:`measure_fidelity` is what ``upq quantize`` (its report and model card),
``upq eval --tasks fidelity`` and ``make demo`` run; benchmarks that score several students against
one teacher build the :class:`FidelityReference` once and call :func:`fidelity` per student.

No network and no benchmark data are needed, so it runs anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..chat import chat_prompt_ids, generate_answers
from ..distill import generalized_jsd
from ..prompts import EVAL_PROMPTS
from .topicality import topicality


@dataclass
class FidelityReference:
    """Teacher-forced inputs: prompt ids and the teacher's answer ids, per prompt."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]

    @classmethod
    def build(cls, teacher, tokenizer, prompts: list[str] | None = None, max_new_tokens: int = 64,
              batch_size: int = 8, progress: bool = False) -> "FidelityReference":
        if prompts is None:
            prompts = list(EVAL_PROMPTS)
        answers = generate_answers(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress, desc="teacher answers")
        return cls(prompts, [chat_prompt_ids(tokenizer, p) for p in prompts], answers)

    def batches(self, batch_size: int):
        """(input_ids, attention_mask, answer_mask) with right padding; answer_mask marks the positions
        whose next token is an answer token."""
        for start in range(0, len(self.prompts), batch_size):
            rows = [(p, a) for p, a in zip(self.prompt_ids[start:start + batch_size],
                                           self.answer_ids[start:start + batch_size]) if a]
            if not rows:
                continue
            width = max(len(p) + len(a) for p, a in rows)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)
            attention = torch.zeros(len(rows), width, dtype=torch.long)
            answer_mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, (p, a) in enumerate(rows):
                seq = p + a
                input_ids[i, :len(seq)] = torch.tensor(seq)
                attention[i, :len(seq)] = 1
                answer_mask[i, len(p) - 1:len(seq) - 1] = True
            yield input_ids, attention, answer_mask


def token_divergences(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token top-1 agreement, KL(T||S) and JSD(beta=0.5) from ``(T, V)`` logits, in float32."""
    top1 = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).float()
    return {"top1": top1, "kl": generalized_jsd(student_logits, teacher_logits, beta=0.0),
            "jsd": generalized_jsd(student_logits, teacher_logits, beta=0.5)}


@torch.no_grad()
def fidelity(student, teacher, reference: FidelityReference, batch_size: int = 8,
             chunk_tokens: int = 64) -> dict[str, float]:
    """Mean top-1 agreement, KL(teacher || student) and JSD over the reference's answer tokens.

    Memory: each model's full ``(batch, length, vocab)`` logits are dropped as soon as their answer rows are taken,
    and the divergences run ``chunk_tokens`` rows at a time (their float32 temporaries are seven vocab-wide
    copies of the rows: 0.6 GB for a batch of 8 answers of 64 tokens at a 49,152-token vocabulary, where a streamed
    1B model's whole budget is 2 GB). Every per-token value is a function of its own row, and each batch's values
    are summed at once as before, so the numbers do not depend on ``chunk_tokens``."""
    sums = {"top1": 0.0, "kl": 0.0, "jsd": 0.0}
    count = 0
    s_device = next(student.parameters()).device
    t_device = next(teacher.parameters()).device
    for input_ids, attention, answer_mask in reference.batches(batch_size):
        mask = answer_mask.to(t_device)
        t_logits = teacher(input_ids=input_ids.to(t_device), attention_mask=attention.to(t_device)).logits
        t_rows = t_logits[mask]
        del t_logits
        s_logits = student(input_ids=input_ids.to(s_device), attention_mask=attention.to(s_device)).logits
        s_rows = s_logits.to(t_device)[mask]
        del s_logits
        parts = [token_divergences(t_rows[i:i + chunk_tokens], s_rows[i:i + chunk_tokens])
                 for i in range(0, t_rows.shape[0], chunk_tokens)]
        for key in sums:
            sums[key] += float(torch.cat([part[key] for part in parts]).sum())
        count += int(mask.sum())
    return {key: value / max(count, 1) for key, value in sums.items()} | {"tokens": count}


def held_out_prompts(limit: int | float | None = None) -> list[str]:
    """The held-out chat prompts (``EVAL_PROMPTS``, never used for calibration or training): all of them,
    the first ``limit``, or with ``0 < limit < 1`` that share of them (at least one)."""
    prompts = list(EVAL_PROMPTS)
    if limit is None:
        return prompts
    count = int(limit) if limit >= 1 else max(1, int(round(limit * len(prompts))))
    return prompts[:count]


def measure_fidelity(student, teacher, tokenizer, limit: int | float | None = None, *, max_new_tokens: int = 64,
                     batch_size: int = 8, progress: bool = False, answers: bool = False) -> dict:
    """Top-1 agreement, KL and JSD of ``student`` to ``teacher`` on :func:`held_out_prompts` ``(limit)``,
    with the numbers of answer tokens and prompts scored and the teacher's answer length. ``answers``: also
    the student's own greedy answers to those prompts (``"answers"``, text, up to ``max_new_tokens``), how
    many are not empty (``"non_empty"``: teacher-forced scores do not show a model that ends every answer
    at once) and how many the teacher ties to their own prompt (``"on_topic"``, :func:`.topicality.topicality`),
    with the teacher's own answers' count beside it (``"teacher_on_topic"``, the ceiling)."""
    prompts = held_out_prompts(limit)
    reference = FidelityReference.build(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, progress=progress)
    scores = fidelity(student, teacher, reference, batch_size=batch_size)
    out = {"top1": scores["top1"], "kl": scores["kl"], "jsd": scores["jsd"], "tokens": scores["tokens"],
           "prompts": len(prompts), "max_new_tokens": max_new_tokens}
    if answers:
        texts = answer_texts(student, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress)
        teacher_texts = decode_answers(tokenizer, reference.answer_ids)
        out.update(answers=dict(zip(prompts, texts)), non_empty=sum(bool(t) for t in texts),
                   on_topic=topicality(teacher, tokenizer, prompts, texts)["on_topic"],
                   teacher_on_topic=topicality(teacher, tokenizer, prompts, teacher_texts)["on_topic"])
    return out


def report_metrics(scores: dict) -> dict:
    """The numbers of a :func:`measure_fidelity` run with ``answers=True`` as ``upq quantize`` and the demo record
    them (``upq_report.json`` and the model card)."""
    return {"fidelity_top1": round(scores["top1"], 4), "fidelity_kl": round(scores["kl"], 4),
            "fidelity_jsd": round(scores["jsd"], 4), "fidelity_tokens": scores["tokens"],
            "answers_non_empty": scores["non_empty"], "answers_on_topic": scores["on_topic"],
            "teacher_answers_on_topic": scores["teacher_on_topic"], "answers_prompts": scores["prompts"]}


def decode_answers(tokenizer, rows) -> list[str]:
    """Generated answer token ids as text: special tokens dropped, whitespace stripped."""
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def answer_texts(model, tokenizer, prompts, *, max_new_tokens: int = 64, batch_size: int = 8,
                 progress: bool = False) -> list[str]:
    """``model``'s greedy answers to chat ``prompts``, decoded (special tokens dropped, whitespace stripped)."""
    ids = generate_answers(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc="student answers")
    return decode_answers(tokenizer, ids)
