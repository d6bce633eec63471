"""Generalized JSD (hand-computed values, symmetry, limits, TRL) and UPQDistillTrainer."""

import math

import pytest
import torch
from transformers import TrainingArguments

from upq_hf.distill import UPQDistillTrainer, select_trainable, chunked_cross_entropy, chunked_jsd, generalized_jsd
from upq_hf.qat import QATLinear, qat_layers, to_qat

from helpers import random_blocks, tiny_llama


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_jsd_matches_hand_computed_value():
    p_t, p_s = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    t_logits = torch.tensor([[math.log(x) for x in p_t]])
    s_logits = torch.tensor([[math.log(x) for x in p_s]])
    for beta in (0.5, 0.2, 0.9):
        m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
        expected = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
        got = generalized_jsd(s_logits, t_logits, beta=beta).item()
        assert got == pytest.approx(expected, rel=1e-6)
    # beta 0.5 by hand: M = (0.4, 0.25, 0.35); KL(T||M) = 0.2218261, KL(S||M) = 0.2394650
    assert generalized_jsd(s_logits, t_logits, 0.5).item() == pytest.approx(0.2306456, abs=1e-6)


def test_temperature_flattens_both_distributions():
    t_logits, s_logits = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    hot = generalized_jsd(s_logits, t_logits, 0.5, temperature=2.0)
    assert hot.item() == pytest.approx(generalized_jsd(s_logits / 2, t_logits / 2, 0.5).item(), rel=1e-6)
    assert hot < generalized_jsd(s_logits, t_logits, 0.5)


def test_symmetric_at_half_and_bounded_by_ln2():
    torch.manual_seed(0)
    a, b = torch.randn(16, 50) * 3, torch.randn(16, 50) * 3
    torch.testing.assert_close(generalized_jsd(a, b, 0.5), generalized_jsd(b, a, 0.5))
    assert bool((generalized_jsd(a, b, 0.5) <= math.log(2) + 1e-6).all())
    assert generalized_jsd(a, a, 0.5).abs().max() < 1e-6


def test_limits_are_forward_and_reverse_kl():
    torch.manual_seed(1)
    s, t = torch.randn(8, 20), torch.randn(8, 20)
    s_logp, t_logp = s.log_softmax(-1), t.log_softmax(-1)
    forward = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    reverse = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    eps = 1e-4
    torch.testing.assert_close(generalized_jsd(s, t, eps) / eps, forward, rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - eps) / eps, reverse, rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), forward)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), reverse)


def test_matches_trl_generalized_jsd_loss():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    torch.manual_seed(2)
    s, t = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, 7, 8, 9, -100]])
    mask = labels != -100
    for beta, temperature in ((0.5, 1.0), (0.1, 2.0), (0.0, 1.0), (1.0, 0.5)):
        ours = generalized_jsd(s, t, beta, temperature)[mask].mean()
        theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_full_loss_and_gradients():
    torch.manual_seed(3)
    hidden_s = torch.randn(37, 16, requires_grad=True)
    hidden_t = torch.randn(37, 16)
    head_s, head_t = torch.randn(100, 16), torch.randn(100, 16)
    full = generalized_jsd(hidden_s @ head_s.t(), hidden_t @ head_t.t(), 0.3).sum()
    (grad_full,) = torch.autograd.grad(full, hidden_s)
    chunked = chunked_jsd(hidden_s, hidden_t, head_s, head_t, 0.3, chunk_size=8)
    (grad_chunked,) = torch.autograd.grad(chunked, hidden_s)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-5, atol=1e-6)
    labels = torch.randint(0, 100, (37,))
    ce = torch.nn.functional.cross_entropy(hidden_s @ head_s.t(), labels, reduction="sum")
    torch.testing.assert_close(chunked_cross_entropy(hidden_s, head_s, labels, chunk_size=5), ce, rtol=1e-5, atol=1e-4)


def test_bf16_teacher_next_to_fp32_student():
    """A teacher kept in bf16 (to save memory) gives the loss of its bf16 logits: equal to computing those
    logits by hand, and close to the fp32 teacher's."""
    torch.manual_seed(4)
    hidden_s = torch.randn(21, 16, requires_grad=True)
    hidden_t, head_s, head_t = torch.randn(21, 16), torch.randn(100, 16), torch.randn(100, 16)
    t_bf16 = (hidden_t.bfloat16() @ head_t.bfloat16().t()).float()
    expected = generalized_jsd(hidden_s @ head_s.t(), t_bf16, 0.5).sum()
    got = chunked_jsd(hidden_s, hidden_t.bfloat16(), head_s, head_t.bfloat16(), 0.5, chunk_size=8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fp32 = chunked_jsd(hidden_s, hidden_t, head_s, head_t, 0.5, chunk_size=8)
    torch.testing.assert_close(got, fp32, rtol=2e-2, atol=0)


def test_bad_beta_rejected():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(torch.zeros(1, 3), torch.zeros(1, 3), beta=1.5)


# ------------------------------------------------------------------------------------------------ trainer

def student_and_teacher():
    # a wider init than the default gives peaked distributions, so INT2 starts visibly off the teacher
    teacher = tiny_llama(seed=0, initializer_range=0.1)
    student = tiny_llama(seed=0, initializer_range=0.1)
    to_qat(student, bits=2, group_size=32)
    select_trainable(student)
    return student, teacher


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=3e-3, max_steps=8,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                lr_scheduler_type="constant", disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_lowers_jsd_and_keeps_param_groups(tmp_path):
    student, teacher = student_and_teacher()
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=random_blocks(),
                                beta=0.5, scale_learning_rate=1e-2)
    batch = {k: torch.stack([random_blocks()[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        before = trainer.compute_loss(student, batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(student, batch).item()
    assert after < 0.85 * before
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["weights"]["lr"] == 3e-3 and groups["scales"]["lr"] == 1e-2
    n_layers = len(qat_layers(student))
    assert len(groups["scales"]["params"]) == n_layers and len(groups["weights"]["params"]) == n_layers
    assert all(isinstance(p, torch.nn.Parameter) for p in groups["weights"]["params"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all("learning_rate" in e for e in trainer.state.log_history if "loss" in e)


def test_ntp_objective_needs_no_teacher(tmp_path):
    student, _ = student_and_teacher()
    trainer = UPQDistillTrainer(model=student, objective="ntp", args=args(tmp_path, max_steps=3),
                                train_dataset=random_blocks())
    trainer.train()
    first = trainer.state.log_history[0]["loss"]
    assert 0 < first < 2 * math.log(128)


def test_padding_is_masked(tmp_path):
    student, teacher = student_and_teacher()
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=random_blocks())
    ids = random_blocks()[0]["input_ids"][None]
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = trainer.compute_loss(student, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        with_pad = trainer.compute_loss(student, {"input_ids": padded, "attention_mask": mask})
    torch.testing.assert_close(plain, with_pad, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_gives_the_same_model(tmp_path):
    student, teacher = student_and_teacher()
    straight = UPQDistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path / "a", max_steps=4),
                                 train_dataset=random_blocks())
    straight.train()
    reference = {k: v.clone() for k, v in student.state_dict().items()}

    student, teacher = student_and_teacher()
    first = UPQDistillTrainer(model=student, teacher_model=teacher, train_dataset=random_blocks(),
                              args=args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2))
    first.train()
    student, teacher = student_and_teacher()  # a fresh process would start here
    resumed = UPQDistillTrainer(model=student, teacher_model=teacher, train_dataset=random_blocks(),
                                args=args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    assert isinstance(student.model.layers[0].mlp.up_proj, QATLinear)


def test_optimizer_measures_in_quantization_steps_unless_told_not_to(tmp_path):
    from upq_hf.optim import StepAdam

    student, teacher = student_and_teacher()
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=random_blocks(),
                                scale_learning_rate=1e-2)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, StepAdam)
    groups = {g["name"]: g for g in optimizer.param_groups}
    layer = next(iter(qat_layers(student).values()))
    assert optimizer.unit_of(layer.weight) is layer.weight_scale  # live: the current scale
    assert optimizer.unit_of(layer.weight_scale) is layer.weight_scale
    plain = UPQDistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path / "plain"),
                              train_dataset=random_blocks(), scale_learning_rate=1e-2, step_units=False)
    optimizer = plain.create_optimizer()
    assert type(optimizer) is torch.optim.AdamW
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"scales": 1e-2, "weights": 3e-3}
    assert all("units" not in g for g in optimizer.param_groups)


def test_train_norms_adds_the_norm_weights_and_trains_them(tmp_path):
    student, teacher = student_and_teacher()
    quantized = select_trainable(student)
    norms = {n: p.detach().clone() for n, p in student.named_parameters() if "norm" in n}
    n_norm = sum(p.numel() for p in norms.values())
    assert n_norm > 0 and select_trainable(student, train_norms=True) == quantized + n_norm
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path, max_steps=3),
                                train_dataset=random_blocks(), scale_learning_rate=1e-2)
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert len(groups["norms"]["params"]) == len(norms) and "other" not in groups
    after = dict(student.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in norms.items())
    assert not student.model.embed_tokens.weight.requires_grad


def test_norm_weights_move_relative_to_their_size(tmp_path):
    """Adam's first update is lr * sign(grad); in the norms group it is scaled by the tensor's mean |w|,
    so a norm whose weights are 100x smaller moves 100x less."""
    student, teacher = student_and_teacher()
    select_trainable(student, train_norms=True)
    with torch.no_grad():
        student.model.layers[0].input_layernorm.weight.mul_(0.01)
    norms = {n: p.detach().clone() for n, p in student.named_parameters() if "norm" in n}
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher, train_dataset=random_blocks(),
                                args=args(tmp_path, max_steps=1, max_grad_norm=0.0, warmup_steps=0,
                                          lr_scheduler_type="constant"),
                                scale_learning_rate=1e-2)
    trainer.train()
    after = dict(student.named_parameters())
    for name, before in norms.items():
        moved = (after[name].detach() - before).abs()
        expected = 1e-2 * before.abs().mean()
        assert moved.max() > 0, name
        torch.testing.assert_close(moved[moved > 0], expected.expand_as(moved[moved > 0]), rtol=1e-3, atol=0,
                                   msg=name)


# ------------------------------------------------------------------------------------------------ cached teacher

def test_topk_log_probs_coarsen_exactly():
    from upq_hf.distill import topk_log_probs

    torch.manual_seed(0)
    logits = torch.randn(5, 11) * 3
    ids = logits.topk(3, dim=-1).indices
    coarse = topk_log_probs(logits, ids)
    probs = logits.softmax(-1)
    torch.testing.assert_close(coarse[:, :3].exp(), probs.gather(-1, ids))
    torch.testing.assert_close(coarse[:, 3].exp(), 1 - probs.gather(-1, ids).sum(-1))  # the tail bucket
    torch.testing.assert_close(coarse.exp().sum(-1), torch.ones(5))
    # a confident row whose tail is far below float32's resolution of 1 - p: still finite and exact
    sharp = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
    tail = topk_log_probs(sharp, torch.tensor([[0]]))[0, 1].item()
    assert tail == pytest.approx(math.log(3) - 30 - math.log1p(3 * math.exp(-30)), abs=1e-5)


def test_teacher_topk_caches_the_teacher_distribution():
    from upq_hf.distill import teacher_topk

    teacher = tiny_llama(seed=0, initializer_range=0.1)
    ids = torch.randint(0, 128, (3, 10))
    top_ids, top_logp = teacher_topk(teacher, ids, k=8, batch_size=2)
    assert top_ids.shape == (3, 10, 8) and top_ids.dtype == torch.int32 and top_logp.shape == (3, 10, 9)
    with torch.no_grad():
        full = torch.log_softmax(teacher(ids).logits.float(), -1)
    expected, expected_ids = full.topk(8, dim=-1)
    assert torch.equal(top_ids.long(), expected_ids)
    torch.testing.assert_close(top_logp[..., :8], expected)
    rest = 1 - expected.exp().sum(-1)
    torch.testing.assert_close(top_logp[..., 8].exp(), rest, atol=1e-6, rtol=1e-4)


def test_topk_jsd_is_the_divergence_of_the_coarsened_pair_and_a_lower_bound():
    from upq_hf.distill import chunked_topk_jsd, topk_log_probs

    torch.manual_seed(0)
    head = torch.randn(50, 16)
    s_hidden, t_hidden = torch.randn(9, 16, requires_grad=True), torch.randn(9, 16)
    t_logits = t_hidden @ head.t()
    t_logp = torch.log_softmax(t_logits, -1)
    ids = t_logp.topk(6, -1).indices
    cached = torch.cat([t_logp.gather(-1, ids), torch.logsumexp(t_logp.scatter(-1, ids, float("-inf")), -1,
                                                                    keepdim=True)], -1)
    for beta in (0.0, 0.5, 1.0):
        got = chunked_topk_jsd(s_hidden, head, ids, cached, beta=beta, chunk_size=4)
        coarse_s = topk_log_probs(s_hidden @ head.t(), ids)
        expected = generalized_jsd(coarse_s, cached, beta).sum()  # log-probs are their own logits
        torch.testing.assert_close(got, expected)
        full = generalized_jsd(s_hidden @ head.t(), t_logits, beta).sum()
        assert got.item() <= full.item() + 1e-5  # coarsening never adds divergence
    got.backward()
    assert s_hidden.grad is not None and torch.isfinite(s_hidden.grad).all()


def test_trainer_on_cached_teacher_matches_the_live_teacher(tmp_path):
    """Top-k over the whole vocabulary but one token: the cached loss is the live loss (one tail token is the
    same as itself), and training needs no teacher model."""
    from upq_hf.distill import TeacherTargetsDataset

    student, teacher = student_and_teacher()
    blocks = random_blocks(n=8)
    cached = TeacherTargetsDataset.build(blocks, teacher, k=127, batch_size=4)
    batch = {k: torch.stack([cached[i][k] for i in range(8)]) for k in cached[0]}
    live = UPQDistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=blocks)
    offline = UPQDistillTrainer(model=student, args=args(tmp_path), train_dataset=cached)  # no teacher_model
    with torch.no_grad():
        plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        torch.testing.assert_close(offline.compute_loss(student, batch), live.compute_loss(student, plain),
                                   rtol=1e-4, atol=1e-5)
    before = offline.compute_loss(student, batch).item()
    offline.train()
    assert offline.compute_loss(student, batch).item() < 0.9 * before


def test_jsd_without_teacher_or_cache_is_refused(tmp_path):
    student, _ = student_and_teacher()
    with pytest.raises(ValueError, match="needs a teacher_model"):
        UPQDistillTrainer(model=student, args=args(tmp_path), train_dataset=random_blocks())
