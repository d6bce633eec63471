"""Test set-up shared by the suite.

``TRITON_INTERPRET`` is read when a Triton kernel is decorated, so it is set here, before any test
module imports ``upq_kernels``: without a GPU the kernels run under Triton's CPU interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
