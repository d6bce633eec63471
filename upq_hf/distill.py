"""Distill-QAT: the generalized Jensen-Shannon divergence and ``UPQDistillTrainer``.

``JSD_beta(P_T || P_S) = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)`` with
``M = beta * P_T + (1 - beta) * P_S``, per token over the full vocabulary, at a temperature, only
on tokens that count. ``beta = 0`` and ``beta = 1`` are taken as the limits (divided by ``beta`` or
``1 - beta``): forward KL(T || S) and reverse KL(S || T). The same definition as TRL's GKD
``generalized_jsd_loss``.

Memory: the loss is computed from the final hidden states in chunks of tokens; each chunk's logits
(student and teacher) exist only inside a checkpointed function, so peak memory grows with
``chunk_size x vocabulary``, not with ``sequence length x vocabulary``.

The trainer is a plain ``transformers.Trainer`` subclass: DDP/FSDP/DeepSpeed come from accelerate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

OBJECTIVES = ("jsd", "ntp")


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-token generalized JSD (nats) between ``(..., V)`` logits, computed in float32."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:  # limit of JSD / beta: KL(T || S)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if beta == 1.0:  # limit of JSD / (1 - beta): KL(S || T)
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
    kl_t = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
    kl_s = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def _chunk_jsd_sum(s_hidden, t_hidden, s_weight, t_weight, beta, temperature):
    s_logits = F.linear(s_hidden.to(s_weight.dtype), s_weight)  # a bf16 head (streamed models) takes bf16
    with torch.no_grad():
        t_logits = F.linear(t_hidden.to(t_weight.dtype), t_weight)
    return generalized_jsd(s_logits, t_logits, beta, temperature).sum()


def _chunk_ce_sum(s_hidden, s_weight, labels):
    return F.cross_entropy(F.linear(s_hidden.to(s_weight.dtype), s_weight).float(), labels, reduction="sum")


def chunked_jsd(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: torch.Tensor,
                teacher_head: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
                chunk_size: int = 512) -> torch.Tensor:
    """Sum of per-token JSD over ``(T, H)`` hidden states (already masked to the tokens that count),
    through the output heads ``(V, H)``, ``chunk_size`` tokens at a time with recomputation."""
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_size):
        s_chunk = student_hidden[start:start + chunk_size]
        # the teacher's logits in the teacher's dtype (a bf16 teacher next to an fp32 student is common)
        t_chunk = teacher_hidden[start:start + chunk_size].to(s_chunk.device, teacher_head.dtype)
        if s_chunk.requires_grad:
            total = total + checkpoint(_chunk_jsd_sum, s_chunk, t_chunk, student_head, teacher_head.to(s_chunk.device),
                                       beta, temperature, use_reentrant=False)
        else:
            total = total + _chunk_jsd_sum(s_chunk, t_chunk, student_head, teacher_head.to(s_chunk.device),
                                           beta, temperature)
    return total


def topk_log_probs(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The student's log-probabilities coarsened onto a cached teacher's support: ``(T, k + 1)``, the ``k``
    tokens ``topk_ids`` ``(T, k)`` and, last, the tail bucket holding the rest of the vocabulary (computed
    exactly, as a log-sum-exp over the logits outside the top k, not as ``1 - sum``)."""
    logits = student_logits.float()
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = logits.gather(-1, topk_ids) - norm
    tail = torch.logsumexp(logits.scatter(-1, topk_ids, float("-inf")), dim=-1, keepdim=True) - norm
    return torch.cat([top, tail], dim=-1)


def _chunk_topk_sum(s_hidden, s_weight, topk_ids, teacher_logp, beta, temperature):
    s_logits = F.linear(s_hidden.to(s_weight.dtype), s_weight)  # a bf16 head (streamed models) takes bf16
    if temperature != 1.0:
        s_logits = s_logits / temperature
    student = topk_log_probs(s_logits, topk_ids)
    return generalized_jsd(student, teacher_logp.float(), beta, 1.0).sum()


def chunked_topk_jsd(student_hidden: torch.Tensor, student_head: torch.Tensor, topk_ids: torch.Tensor,
                     teacher_logp: torch.Tensor, beta: float = 0.0, temperature: float = 1.0,
                     chunk_size: int = 512) -> torch.Tensor:
    """Sum over ``(T, H)`` hidden states of the generalized JSD between the teacher's cached distribution,
    coarsened to its top k tokens plus a tail bucket (``teacher_logp`` ``(T, k + 1)``, the tail last, see
    :func:`teacher_topk`), and the student's distribution coarsened the same way. The divergence of the
    coarsened pair is a lower bound of the full one (it ignores how each side spreads its tail); with
    ``k = 0`` nothing but the tail is left. ``temperature`` applies to the student here; the teacher's was
    applied when its distribution was cached."""
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_size):
        args = (student_hidden[start:start + chunk_size], student_head, topk_ids[start:start + chunk_size],
                teacher_logp[start:start + chunk_size].to(student_hidden.device), beta, temperature)
        if args[0].requires_grad:
            total = total + checkpoint(_chunk_topk_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_topk_sum(*args)
    return total


@torch.no_grad()
def teacher_topk(teacher: nn.Module, input_ids: torch.Tensor, k: int = 64, temperature: float = 1.0,
                 batch_size: int = 8, attention_mask: torch.Tensor | None = None,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's next-token distributions over ``input_ids`` ``(N, L)``, cached once so that training
    runs no teacher forward pass: ``(ids, logp)``, the ``k`` most likely tokens per position ``(N, L, k)``
    (int32) and their log-probabilities followed by the log of the remaining mass ``(N, L, k + 1)``
    (float32). Position ``t`` holds the distribution of token ``t + 1`` (the last position is kept
    for simplicity; the loss never reads it)."""
    from tqdm.auto import tqdm

    device = next(teacher.parameters()).device
    n, length = input_ids.shape
    ids = torch.empty(n, length, k, dtype=torch.int32)
    logp = torch.empty(n, length, k + 1, dtype=torch.float32)
    was_training = teacher.training
    teacher.eval()
    for start in tqdm(range(0, n, batch_size), desc="teacher distributions", unit="batch", disable=not progress):
        rows = input_ids[start:start + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
        logits = teacher(input_ids=rows, attention_mask=mask, use_cache=False).logits
        for row in range(len(rows)):  # one sequence's vocabulary-wide temporaries at a time
            log_probs = F.log_softmax(logits[row].float() / temperature, dim=-1)
            top_logp, top_ids = log_probs.topk(k, dim=-1)
            rest = torch.logsumexp(log_probs.scatter(-1, top_ids, float("-inf")), dim=-1, keepdim=True)
            ids[start + row] = top_ids.to("cpu", torch.int32)
            logp[start + row] = torch.cat([top_logp, rest], dim=-1).cpu()
        del logits
    teacher.train(was_training)
    return ids, logp


def chunked_cross_entropy(student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 512) -> torch.Tensor:
    """Sum of next-token cross-entropy over ``(T, H)`` hidden states and their ``(T,)`` labels."""
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_size):
        args = (student_hidden[start:start + chunk_size], student_head, labels[start:start + chunk_size])
        total = total + (checkpoint(_chunk_ce_sum, *args, use_reentrant=False) if args[0].requires_grad
                         else _chunk_ce_sum(*args))
    return total


TEACHER_KEYS = ("teacher_topk_ids", "teacher_topk_logp")


class TeacherTargetsDataset(torch.utils.data.Dataset):
    """A token-block dataset (items ``{"input_ids", "attention_mask", "labels"}``) with the teacher's cached
    top-k distributions (:func:`teacher_topk`) added to every item, so that ``UPQDistillTrainer`` trains
    without running the teacher."""

    has_teacher = True

    def __init__(self, blocks, topk_ids: torch.Tensor, topk_logp: torch.Tensor):
        if len(blocks) != len(topk_ids) or len(topk_ids) != len(topk_logp):
            raise ValueError(f"{len(blocks)} blocks but teacher targets for {len(topk_ids)} / {len(topk_logp)}")
        self.blocks, self.topk_ids, self.topk_logp = blocks, topk_ids, topk_logp

    @classmethod
    def build(cls, blocks, teacher: nn.Module, k: int = 64, temperature: float = 1.0, batch_size: int = 8,
              progress: bool = False) -> "TeacherTargetsDataset":
        ids, logp = teacher_topk(teacher, blocks.input_ids, k=k, temperature=temperature, batch_size=batch_size,
                                 progress=progress)
        return cls(blocks, ids, logp)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.blocks[index])
        item["teacher_topk_ids"] = self.topk_ids[index]
        item["teacher_topk_logp"] = self.topk_logp[index]
        return item


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def untied_head(model: nn.Module) -> nn.Parameter | None:
    """The output head's weight where it is a matrix of its own (not the input embeddings'), else None."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, nn.Parameter) or (embeddings is not None and weight is embeddings.weight):
        return None
    return weight


def select_trainable(model: nn.Module, train_norms: bool = False, train_head: bool = False) -> int:
    """Train only the quantized layers' latent weights, scales and zero points (only their scales where
    their codes are frozen, :meth:`upq_hf.qat.QATLinear.freeze_codes`; embeddings and the output
    head stay as the teacher has them; everything else gets ``requires_grad=False``), and with
    ``train_norms`` the normalisation layers' weights too (a few thousand parameters that let each block
    rescale what the quantized layers give it), and with ``train_head`` the output head where it is untied
    (:func:`untied_head`). Returns the number of trainable parameters. (Not to be
    confused with :func:`upq_hf.qat.freeze_model`, which packs QAT layers into integers.)"""
    from .qat import QATLinear

    model.requires_grad_(False)
    count = 0
    for module in model.modules():
        if isinstance(module, QATLinear):
            # codes frozen (QATLinear.freeze_codes): the scales alone
            names = ("weight_scale",) if module.codes is not None else ("weight", "weight_scale", "weight_zero")
        elif train_norms and _is_norm(module):
            names = ("weight", "bias")
        else:
            continue
        for name in names:
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(True)
                count += param.numel()
    head = untied_head(model) if train_head else None
    if head is not None:
        head.requires_grad_(True)
        count += head.numel()
    return count


#: the old name, kept as an alias (the README's examples used it)
freeze_all_but_quantized = select_trainable


def _final_hidden(model, input_ids, attention_mask):
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                use_cache=False)
    return out.hidden_states[-1]


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class UPQDistillTrainer(Trainer):
    """Trains a student in QAT mode (``upq_hf.qat.QATLinear`` layers) against a frozen teacher.

    Args (besides ``Trainer``'s):
        teacher_model: the unquantized model; frozen, may sit on another device (``teacher_device``).
        objective: ``"jsd"`` (generalized JSD to the teacher) or ``"ntp"`` (next-token cross-entropy,
            the ParetoQ recipe; no teacher needed).
        beta, temperature: of the generalized JSD (default beta 0: its forward-KL limit, KL(T || S); see
            ``UPQConfig``).
        scale_learning_rate: learning rate of the quantization scales (default 10x the weights').
        head_learning_rate: of a trained (untied) output head, relative to its mean magnitude (with
            ``step_units``; default ``scale_learning_rate``).
        step_units: measure learning rates in quantization steps (:class:`upq_hf.optim.StepAdam`; default)
            rather than absolutely (the Trainer's ``args.optim``); see :meth:`create_optimizer`.
        chunk_size: tokens per chunk of the loss.
    """

    def __init__(self, *args, teacher_model: nn.Module | None = None, objective: str = "jsd", beta: float = 0.0,
                 temperature: float = 1.0, scale_learning_rate: float | None = None,
                 head_learning_rate: float | None = None, step_units: bool = True,
                 chunk_size: int = 512,
                 teacher_device: str | torch.device | None = None, **kwargs):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "jsd" and teacher_model is None and not getattr(kwargs.get("train_dataset"), "has_teacher", False):
            raise ValueError("objective='jsd' needs a teacher_model (or a dataset of cached teacher distributions, "
                             "upq_hf.distill.TeacherTargetsDataset)")
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.beta = beta
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.scale_learning_rate = scale_learning_rate
        self.head_learning_rate = head_learning_rate
        self.step_units = step_units
        self.teacher = teacher_model
        if self.teacher is not None:
            self.teacher.eval()
            self.teacher.requires_grad_(False)
            device = teacher_device if teacher_device is not None else self.args.device
            self.teacher.to(device)

    def _set_signature_columns_if_needed(self):
        # the cached teacher distributions are inputs of the loss, not of the model's forward: keep them when the
        # Trainer drops the batch keys that the forward signature does not name (remove_unused_columns)
        super()._set_signature_columns_if_needed()
        for key in TEACHER_KEYS:
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    # -------------------------------------------------------------- optimiser: weights and scales apart
    def create_optimizer(self, model=None):
        """Quantized layers' weights, scales (and INT4 zero points) in their own groups. With
        ``step_units`` (the default) the optimizer is :class:`upq_hf.optim.StepAdam`: ``learning_rate``
        is the fraction of a quantization step a latent weight moves per update and
        ``scale_learning_rate`` the relative change of a scale per update, the same in every layer.
        Trained normalisation weights (``train_norms``) then change relative to their own size at
        ``scale_learning_rate`` too (:func:`upq_hf.optim.relative_param_group`), a trained output head at
        ``head_learning_rate``. Otherwise it is the
        Trainer's optimizer (``args.optim``) with absolute learning rates. Any other trainable parameter
        goes in a plain group at ``learning_rate``."""
        if self.optimizer is not None:
            return self.optimizer
        from .optim import StepAdam, quantized_param_groups, relative_param_group
        from .qat import QATLinear

        model = _unwrap(model if model is not None else self.model)
        lr = self.args.learning_rate
        scale_lr = self.scale_learning_rate if self.scale_learning_rate is not None else 10 * lr
        qat = [m for m in model.modules() if isinstance(m, QATLinear)]
        groups = quantized_param_groups(qat, lr, scale_lr, live_units=self.step_units)
        if not self.step_units:
            for group in groups:
                group.pop("units", None)
        grouped = {id(p) for g in groups for p in g["params"]}
        if self.step_units:
            norms = [p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)
                     if p.requires_grad and id(p) not in grouped]
            if norms:
                groups.append(relative_param_group(norms, scale_lr, "norms"))
                grouped.update(id(p) for p in norms)
            head = untied_head(model)
            if head is not None and head.requires_grad and id(head) not in grouped:
                head_lr = self.head_learning_rate if self.head_learning_rate is not None else scale_lr
                groups.append(relative_param_group([head], head_lr, "head"))
                grouped.add(id(head))
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
        if others:
            groups.append({"params": others, "lr": lr, "name": "other"})
        if self.step_units:
            self.optimizer = StepAdam(groups, lr=lr, betas=(self.args.adam_beta1, self.args.adam_beta2))
        else:
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            for group in groups:
                group.setdefault("weight_decay", 0.0 if group.get("name") in ("scales", "zeros")
                                 else self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # -------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("labels", input_ids)
        # position t predicts token t + 1; only tokens whose target is a real token count
        target = labels[:, 1:]
        count_mask = target != -100
        if attention_mask is not None:
            count_mask &= attention_mask[:, 1:].bool()
        student_hidden = _final_hidden(model, input_ids, attention_mask)[:, :-1][count_mask]
        head = _unwrap(model).get_output_embeddings().weight
        if self.objective == "ntp":
            loss_sum = chunked_cross_entropy(student_hidden, head, target[count_mask], self.chunk_size)
        elif "teacher_topk_ids" in inputs:  # cached teacher distributions (UPQDistillDataset): no teacher pass
            topk_ids = inputs["teacher_topk_ids"][:, :-1][count_mask].long()
            teacher_logp = inputs["teacher_topk_logp"][:, :-1][count_mask]
            loss_sum = chunked_topk_jsd(student_hidden, head, topk_ids, teacher_logp, self.beta, self.temperature,
                                        self.chunk_size)
        else:
            teacher_device = next(self.teacher.parameters()).device
            with torch.no_grad():
                teacher_hidden = _final_hidden(self.teacher, input_ids.to(teacher_device),
                                               None if attention_mask is None else attention_mask.to(teacher_device))
            teacher_hidden = teacher_hidden[:, :-1][count_mask.to(teacher_device)]
            loss_sum = chunked_jsd(student_hidden, teacher_hidden, head,
                                   self.teacher.get_output_embeddings().weight, self.beta, self.temperature,
                                   self.chunk_size)
        n_tokens = count_mask.sum().clamp_min(1)
        loss = loss_sum / n_tokens
        return (loss, None) if return_outputs else loss
