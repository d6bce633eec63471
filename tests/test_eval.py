"""Offline fidelity numbers and the instruction-following checkers."""

import math

import pytest
import torch

from upq_hf.evaluation import INSTRUCTION_CHECKS, FidelityReference, fidelity, token_divergences

from helpers import tiny_llama


def test_token_divergences_hand_values():
    t = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    s = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    out = token_divergences(t, s)
    expected_kl = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert out["kl"].item() == pytest.approx(expected_kl, rel=1e-6)
    assert out["top1"].item() == 0.0
    assert token_divergences(t, t)["top1"].item() == 1.0 and abs(token_divergences(t, t)["kl"].item()) < 1e-7


def test_fidelity_uses_only_answer_tokens():
    teacher = tiny_llama(seed=0)
    reference = FidelityReference(["a", "b"], [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]])
    batches = list(reference.batches(8))
    (ids, attention, answer_mask), = batches
    assert ids.tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 9, 10]]
    # positions predicting the answer tokens: the last prompt token and every answer token but the last
    assert answer_mask.tolist() == [[False, False, True, True, False], [False, True, True, True, False]]
    same = fidelity(teacher, teacher, reference)
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-6 and same["tokens"] == 5
    other = fidelity(tiny_llama(seed=1), teacher, reference)
    assert other["kl"] > 0.0 and other["jsd"] <= math.log(2)


def test_fidelity_chunks_give_the_same_numbers():
    """The divergences run a few answer rows at a time (memory); the numbers equal one pass over all rows."""
    teacher, student = tiny_llama(seed=0), tiny_llama(seed=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (3, 5, 2, 4)]
    answers = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (9, 4, 12, 7)]
    reference = FidelityReference(["a", "b", "c", "d"], prompts, answers)
    whole = fidelity(student, teacher, reference, chunk_tokens=10_000)
    assert whole["tokens"] == 32
    for chunk in (1, 3, 7):
        assert fidelity(student, teacher, reference, chunk_tokens=chunk) == whole
    assert whole["kl"] > 0.0 and whole["jsd"] > 0.0


@pytest.mark.parametrize("name,good,bad", [
    ("lowercase", "it rains softly.", "It rains."),
    ("max_20_words", "It measures temperature.", " ".join(["word"] * 21)),
    ("three_bullets", "- apple\n- cherry\n- strawberry", "- apple\n- cherry"),
    ("no_commas", "I eat eggs. I drink tea.", "Eggs, tea."),
    ("ends_with", "Keep a routine. Sweet dreams.", "Keep a routine."),
    ("json", '{"city": "Tokyo", "country": "Japan"}', "Tokyo, Japan"),
    ("number_answer", "42", "The answer is 42"),
])
def test_instruction_checkers(name, good, bad):
    check = {n: c for n, _, c in INSTRUCTION_CHECKS}[name]
    assert check(good) and not check(bad)
