"""upq_hf: Unified Progressive Quantization (INT4 block-wise PTQ -> INT2 Distill-QAT) for transformers.

``import upq_hf`` registers ``quant_method="upq"`` with transformers, so that
``AutoModelForCausalLM.from_pretrained(id, quantization_config=UPQConfig(...))`` quantizes and a saved
UPQ checkpoint reloads with plain ``from_pretrained(path)``.
"""

from __future__ import annotations

from .config import UPQConfig
from .nn import UPQLinear
from .quantizer import UPQHfQuantizer, quantize_model, register

__version__ = "0.1.0"

register()
from . import lora  # noqa: E402,F401  registers UPQLinear with PEFT's LoRA (see upq_hf/lora.py)


__all__ = ["UPQConfig", "UPQLinear", "UPQHfQuantizer", "quantize_model", "register", "__version__"]
