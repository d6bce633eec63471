"""upq_hf: Unified Progressive Quantization (INT4 block-wise PTQ -> INT2 Distill-QAT) for transformers.

``import upq_hf`` registers ``quant_method="upq"`` with transformers, so that
``AutoModelForCausalLM.from_pretrained(id, quantization_config=UPQConfig(...))`` quantizes and a saved
UPQ checkpoint reloads with plain ``from_pretrained(path)``.
"""

from __future__ import annotations

from .config import UPQConfig
from .nn import UPQLinear
from .quantizer import UPQHfQuantizer, register

__version__ = "0.1.0"

register()


def quantize_model(model, config: UPQConfig, tokenizer=None, progress: bool = True):
    """Quantize an already-loaded dense model in place following ``config`` and mark it quantized,
    so that ``save_pretrained``/``push_to_hub`` write a UPQ checkpoint. Returns the model."""
    from .quantizer import attach
    from .recipes import apply_recipe

    apply_recipe(model, config, tokenizer=tokenizer, progress=progress)
    return attach(model, config)


__all__ = ["UPQConfig", "UPQLinear", "UPQHfQuantizer", "quantize_model", "register", "__version__"]
