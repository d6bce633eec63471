"""Triton kernels for UPQ INT2/INT4 linear layers, installed as ``upq_kernels``.

Never importable as a top-level ``kernels`` module: that name belongs to Hugging Face's
``kernels`` package, which transformers probes for.
"""
