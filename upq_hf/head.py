"""The output head under the ``a8`` backend: int8 weights, as llama.cpp runs its output matrix.

A UPQ checkpoint keeps the head (and tied embeddings) dense. On a CPU decode step of a small model that head is the
largest single read: 57 MB of bf16 a token for SmolLM2-135M's 49,152 x 576, 131 MB for a 1B model's 32,000 x 2,048.
Where the user has chosen the ``a8`` backend (int8 activations, not exact: :mod:`upq_hf.backends`), the head follows
the same trade: its weights rounded to int8 per output row, ``w = s * q`` with ``s = max|w_row| / 127`` and
``q = rint(w / s)`` in [-127, 127], made once from the stored dense weights (the checkpoint is unchanged), and
bf16 activations multiplied by torch's int8 weight kernel (``aten._weight_int8pack_mm``): half the bytes a token.
The rounding error is at most ``s / 2`` per weight; against an fp32 head on the bundled model it agreed on 96.7% of
next tokens (the bf16 dense head on 97.8%: bf16 logits tie), KL 0.0014 nats (docs/BENCHMARKS.md, "The `a8` backend
at decode, and the head under it").

Only bf16 activations take it (torch's int8 kernel ran 3-10x slower than a dense matmul for fp16 and fp32 on the
CPU: those keep the dense head), on the CPU, without a gradient, where the a8 kernel runs (AVX512-VNNI; elsewhere
the layers run the exact kernel, and so does the head); any other call runs the dense head, as does every call of
a backend other than ``a8``. The int8 copy (one byte per weight, alongside the dense weight the model
keeps for saving and for the embedding it may be tied to) is made on the first eager call that takes it, or by
:func:`install` when the model's config says ``backend="a8"``, and made again by the next eager call after the dense
weight changes (a compiled step uses the copy it found when it was traced).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import avx2
from .backends import ENV


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)``: int8 ``q`` (the weight's shape) and fp32 ``s`` (one per row) with ``weight ~ s[:, None] * q``,
    ``s = max|row| / 127`` (1 for an all-zero row), ``q = rint(weight / s)``, computed in fp32."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class UPQHead(nn.Linear):
    """An ``nn.Linear`` output head that runs with int8 weights under the ``a8`` backend (see the module docstring);
    its parameters, state dict and tying are those of the ``nn.Linear`` it was."""

    backend: str | None = None

    def int8_ready(self) -> bool:
        made = getattr(self, "_int8", None)
        return made is not None and made[2] == (self.weight.data_ptr(), self.weight._version)

    def make_int8(self) -> None:
        q, scale = int8_rows(self.weight)
        self._int8 = (q, scale.to(torch.bfloat16), (self.weight.data_ptr(), self.weight._version))

    def takes(self, x: torch.Tensor) -> bool:
        """a8 chosen (this head's backend, else ``UPQ_BACKEND``) and running here (where the CPU lacks
        AVX512-VNNI the layers run the exact kernel, and so does the head), a bf16 CPU call, no gradient."""
        return ((self.backend or os.environ.get(ENV)) == "a8" and x.is_cpu and x.dtype == torch.bfloat16
                and self.weight.is_cpu and not (torch.is_grad_enabled() and x.requires_grad) and avx2.has_a8())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes(x):
            if torch.compiler.is_compiling():
                ready = getattr(self, "_int8", None) is not None  # made eagerly before the graph (install)
            else:
                if not self.int8_ready():
                    self.make_int8()
                ready = True
            if ready:
                q, scale, _ = self._int8
                y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), q, scale)
                y = y.reshape(*x.shape[:-1], q.shape[0])
                return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)


def install(model, backend: str | None) -> None:
    """Make ``model``'s output head (a plain ``nn.Linear``) a :class:`UPQHead` following ``backend`` (the model's
    ``UPQConfig.backend``; ``None`` follows ``UPQ_BACKEND``); its int8 copy is made now when ``backend`` is
    ``"a8"``. Idempotent; other heads are left as they are."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or type(head) not in (nn.Linear, UPQHead):
        return
    head.__class__ = UPQHead
    head.backend = backend
    if backend == "a8" and head.weight.is_cpu and head.weight.dtype == torch.bfloat16:
        head.make_int8()


def remove(model) -> None:
    """Undo :func:`install` (a dequantized model is a plain dense one)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is UPQHead:
        head.__dict__.pop("_int8", None)
        head.__dict__.pop("backend", None)
        head.__class__ = nn.Linear
