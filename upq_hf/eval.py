"""Offline fidelity of a quantized model to its unquantized teacher.

The teacher answers a set of held-out chat prompts greedily; both models are then run
teacher-forced on ``prompt + teacher answer`` and compared on the answer tokens only:

* ``top1``: how often the student's most likely next token is the teacher's;
* ``kl``: mean per-token KL(teacher || student) in nats;
* ``jsd``: mean per-token Jensen-Shannon divergence (beta = 0.5) in nats.

No network and no benchmark data are needed, so it runs anywhere (``make demo`` prints it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a single-turn chat prompt, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
                     progress: bool = False) -> list[list[int]]:
    """Greedy answers (token ids, up to and including the end-of-turn token) to chat prompts."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[list[int]] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="teacher answers", disable=not progress, unit="batch"):
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id)
        for row in out[:, width:].tolist():
            answer = []
            for token in row:
                answer.append(token)
                if token == tokenizer.eos_token_id:
                    break
            answers.append(answer)
    return answers


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
            from .prompts import EVAL_PROMPTS

            prompts = list(EVAL_PROMPTS)
        answers = generate_answers(teacher, tokenizer, prompts, max_new_tokens, batch_size, progress)
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
    t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    m_logp = torch.logsumexp(torch.stack([t_logp, s_logp]), dim=0) - math.log(2.0)
    jsd = 0.5 * (t_logp.exp() * (t_logp - m_logp)).sum(-1) + 0.5 * (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    top1 = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).float()
    return {"top1": top1, "kl": kl, "jsd": jsd}


@torch.no_grad()
def fidelity(student, teacher, reference: FidelityReference, batch_size: int = 8) -> dict[str, float]:
    """Mean top-1 agreement, KL(teacher || student) and JSD over the reference's answer tokens."""
    sums = {"top1": 0.0, "kl": 0.0, "jsd": 0.0}
    count = 0
    s_device = next(student.parameters()).device
    t_device = next(teacher.parameters()).device
    for input_ids, attention, answer_mask in reference.batches(batch_size):
        t_logits = teacher(input_ids=input_ids.to(t_device), attention_mask=attention.to(t_device)).logits
        s_logits = student(input_ids=input_ids.to(s_device), attention_mask=attention.to(s_device)).logits
        mask = answer_mask.to(t_device)
        per_token = token_divergences(t_logits[mask], s_logits.to(t_device)[mask])
        for key in sums:
            sums[key] += float(per_token[key].sum())
        count += int(mask.sum())
    return {key: value / max(count, 1) for key, value in sums.items()} | {"tokens": count}


# ------------------------------------------------------------------------------------------------
# A small instruction-following check: prompts carrying simple instructions that code can verify.
# Not IFEval (that runs through lm-eval, `upq eval --tasks ifeval`); an offline smoke test of the
# same kind of skill, scored identically for teacher and student.
# ------------------------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return text.split()


def _bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip().startswith(("- ", "* ", "\u2022 ")))


INSTRUCTION_CHECKS: list[tuple[str, str, callable]] = [
    ("lowercase", "Describe a rainy afternoon in a small town. Answer in lowercase letters only, no capitals at all.",
     lambda t: t.strip() != "" and t == t.lower()),
    ("uppercase", "Write one sentence telling a friend to bring an umbrella. Write your whole answer in capital letters.",
     lambda t: t.strip() != "" and t == t.upper()),
    ("max_20_words", "In at most 20 words, explain what a thermometer measures.",
     lambda t: 0 < len(_words(t)) <= 20),
    ("max_10_words", "Using no more than 10 words, say why people drink water.",
     lambda t: 0 < len(_words(t)) <= 10),
    ("three_bullets", "List exactly three fruits that are red, as a markdown list with three '- ' bullet points "
                      "and nothing else.",
     lambda t: _bullets(t) == 3),
    ("no_commas", "Describe your ideal breakfast in two sentences without using any commas.",
     lambda t: t.strip() != "" and "," not in t),
    ("ends_with", "Give one tip for sleeping better. End your answer with the exact words 'Sweet dreams.'",
     lambda t: t.strip().rstrip('"').endswith("Sweet dreams.")),
    ("starts_with", "Start your answer with the word 'Yes'. Is the sun a star?",
     lambda t: t.strip().lower().startswith("yes")),
    ("one_word", "Answer with a single word: what color is the sky on a clear day?",
     lambda t: len(_words(t.strip().strip("."))) == 1),
    ("json", "Return a JSON object with keys \"city\" and \"country\" for the capital of Japan. Output only the JSON.",
     lambda t: _is_json_object(t)),
    ("number_answer", "What is 12 plus 30? Reply with only the number.",
     lambda t: t.strip().rstrip(".") == "42"),
    ("repeat_request", "First repeat the question word for word, then answer it: What is the boiling point of water "
                       "in Celsius?",
     lambda t: "what is the boiling point of water in celsius" in t.lower()),
]


def _is_json_object(text: str) -> bool:
    import json

    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and {"city", "country"} <= set(value)


@torch.no_grad()
def instruction_following(model, tokenizer, max_new_tokens: int = 64, batch_size: int = 6) -> dict:
    """Fraction of :data:`INSTRUCTION_CHECKS` whose greedy answer obeys its instruction, with the answers."""
    prompts = [prompt for _, prompt, _ in INSTRUCTION_CHECKS]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    results = {}
    for (name, _, check), ids in zip(INSTRUCTION_CHECKS, answers):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results[name] = {"ok": bool(check(text)), "answer": text}
    return {"score": sum(r["ok"] for r in results.values()) / len(results), "checks": results}
