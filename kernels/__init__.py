"""Triton kernels for UPQ INT2/INT4 linear layers, installed as ``upq_kernels``.

Never importable as a top-level ``kernels`` module: that name belongs to Hugging Face's
``kernels`` package, which transformers probes for.

Public API:

* :func:`upq_linear` ``(x, module)``: the forward of a ``UPQLinear`` through the ``upq::linear``
  custom op (any leading shape, bias added, result in ``x.dtype``);
* :func:`upq_matmul`: the same on raw tensors for a 2-D ``x``, with ``variant``/``config``/``out``
  to force a kernel, its block sizes and its output buffer;
* :func:`dequantize_packed`: the dense ``(out_features, in_features)`` weight, by a Triton kernel;
* ``RULES``: the row-count thresholds between the variants; ``VARIANTS``: the kernel modules.

See ``README.md`` in this directory for the variants, the dispatch rules and the interpreter.
"""

from __future__ import annotations

# From a checkout's root this folder is also reachable as `kernels`, the name of Hugging Face's package
# that transformers probes for (it imports it when no metadata is found). Imported under that name it
# stays empty, without a __version__, so transformers reads it as "not installed".
if __name__ == "upq_kernels":
    from .api import RULES, VARIANTS, DispatchRules, choose_variant, dequantize_packed, op, upq_linear, upq_matmul

    __all__ = ["upq_linear", "upq_matmul", "dequantize_packed", "choose_variant", "RULES", "DispatchRules",
               "VARIANTS", "op"]
