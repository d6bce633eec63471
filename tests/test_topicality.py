"""``upq_hf.evaluation.topicality``: the unquantized model ties each answer to the prompt it answers."""

from __future__ import annotations

import pytest
import torch

from upq_hf.chat import chat_prompt_ids
from upq_hf.evaluation.topicality import pairing_scores, topicality

PROMPTS = ["Which is the longest river in Africa?", "Share a recipe for a simple lentil soup.",
           "Describe the rules of basketball.", "Tell me three facts about the planet Jupiter."]
ANSWERS = ["The Nile is the longest river in Africa. It flows north through Egypt into the Mediterranean Sea.",
           "Rinse one cup of lentils, fry an onion and a carrot, add the lentils and four cups of stock, and simmer "
           "for thirty minutes.",
           "Two teams of five players score by shooting the ball through the other team's hoop; a player must "
           "dribble while moving.",
           "Jupiter is the largest planet in the solar system, it is a gas giant, and it has dozens of moons."]


@pytest.fixture(scope="module")
def teacher_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upq_hf.models import bundled_model_dir

    folder = bundled_model_dir()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def test_a_score_is_the_answers_mean_log_probability_after_the_prompt(teacher_and_tokenizer):
    teacher, tokenizer = teacher_and_tokenizer
    scores = pairing_scores(teacher, tokenizer, PROMPTS, ANSWERS, batch_size=3)  # batches cut across rows
    assert scores.shape == (4, 4)
    prompt = chat_prompt_ids(tokenizer, PROMPTS[2])
    answer = tokenizer(ANSWERS[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = teacher(torch.tensor([prompt + answer])).logits[0].double()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1),
                                               torch.tensor(answer)].mean()
    assert float(scores[1, 2]) == pytest.approx(float(expected), abs=2e-4)


def test_answers_on_their_subject_are_on_topic_and_others_are_not(teacher_and_tokenizer):
    teacher, tokenizer = teacher_and_tokenizer
    right = topicality(teacher, tokenizer, PROMPTS, ANSWERS)
    assert right == {"on_topic": 4, "answers": 4, "ranks": [1, 1, 1, 1]}
    shifted = topicality(teacher, tokenizer, PROMPTS, ANSWERS[1:] + ANSWERS[:1])
    assert shifted["on_topic"] == 0 and min(shifted["ranks"]) > 1
    some = topicality(teacher, tokenizer, PROMPTS, ["", ANSWERS[1], ANSWERS[0], ANSWERS[3]])
    assert some["on_topic"] == 2 and some["ranks"][0] == 4  # an empty answer takes the worst rank
    assert some["ranks"][1] == some["ranks"][3] == 1 and some["ranks"][2] > 1
    with pytest.raises(ValueError, match="4 prompts but 3 answers"):
        topicality(teacher, tokenizer, PROMPTS, ANSWERS[:3])


def test_the_fidelity_run_counts_answers_on_topic(teacher_and_tokenizer):
    """``measure_fidelity(answers=True)`` (what ``upq quantize``'s report and the demo run): the teacher scored
    against itself answers the same, and its own answers to three held-out prompts are on topic."""
    from upq_hf.evaluation import measure_fidelity

    teacher, tokenizer = teacher_and_tokenizer
    scores = measure_fidelity(teacher, teacher, tokenizer, 3, max_new_tokens=24, answers=True)
    assert scores["top1"] == 1.0 and scores["non_empty"] == 3
    assert scores["on_topic"] == scores["teacher_on_topic"] == 3
