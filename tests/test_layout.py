"""How the checkout is cut: ``kernels/`` is a source root and no package; upq_hf has no import circle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run from the repository's root, where ``sys.path[0]`` is the checkout itself (as under ``python -m
# pytest``): the folder ``kernels/`` is then reachable as a namespace package named ``kernels``.
FROM_THE_ROOT = r"""
import json, sys, warnings
warnings.simplefilter("error")  # a half-imported peft would warn (or fail) here
import peft  # first: transformers probes for Hugging Face's `kernels` package while peft imports it
import upq_hf
import kernels
import upq_kernels
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from transformers.utils.import_utils import is_kernels_available
print(json.dumps({
    "kernels_file": getattr(kernels, "__file__", None),
    "kernels_names": sorted(n for n in vars(kernels) if not n.startswith("__")),
    "kernels_available": is_kernels_available(),
    "upq_kernels_file": upq_kernels.__file__,
    "lora_tuner": PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA].__module__ + "." + PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA].__name__,
}))
"""


@pytest.fixture(scope="module")
def from_the_root():
    out = subprocess.run([sys.executable, "-c", FROM_THE_ROOT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_folder_is_a_source_root_not_a_package(from_the_root):
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix == ".py") == []
    # from the root, `kernels` is an empty namespace package: transformers reads it as "not installed"
    assert from_the_root["kernels_file"] is None and from_the_root["kernels_names"] == []
    assert from_the_root["kernels_available"] is False
    assert Path(from_the_root["upq_kernels_file"]) == ROOT / "kernels" / "upq_kernels" / "__init__.py"


def test_peft_imported_first_from_the_root_registers_lora(from_the_root):
    # peft imported before upq_hf, from the checkout's root: nothing is half-imported, LoRA knows UPQLinear
    assert from_the_root["lora_tuner"] == "upq_hf.lora.UPQLoraModel"
