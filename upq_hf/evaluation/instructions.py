"""A small offline instruction-following check: prompts carrying simple instructions that code can verify.

Not IFEval (that runs through lm-eval, ``upq eval --tasks ifeval``); a smoke test of the same kind of
skill, scored identically for teacher and student, that needs no data and no network.
"""

from __future__ import annotations

import torch

from ..chat import generate_answers


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
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    results = {}
    for (name, _, check), ids in zip(INSTRUCTION_CHECKS, answers):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results[name] = {"ok": bool(check(text)), "answer": text}
    return {"score": sum(r["ok"] for r in results.values()) / len(results), "checks": results}
