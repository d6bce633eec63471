"""Test set-up shared by the suite: the environment and the fixtures (helpers live in ``helpers.py``).

``TRITON_INTERPRET`` is read when a Triton kernel is decorated, so it is set here, before any test
module imports ``upq_kernels``: without a GPU the kernels run under Triton's CPU interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402

from helpers import tiny_llama, tiny_qwen  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen")
    tiny_qwen().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    tensors gain nothing from a second thread, and on a busy machine the threads' barriers cost more than
    the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
