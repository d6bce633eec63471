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
from . import lora  # noqa: E402,F401  registers UPQLinear with PEFT's LoRA (see upq_hf/lora.py)


def quantize_model(model, config: UPQConfig, tokenizer=None, progress: bool = True, callbacks=None):
    """Quantize an already-loaded dense model in place following ``config`` and mark it quantized,
    so that ``save_pretrained``/``push_to_hub`` write a UPQ checkpoint. Returns the model.
    ``callbacks`` (``transformers.TrainerCallback``) reach the trainer of the training recipes."""
    from .quantizer import attach
    from .recipes import apply_recipe

    apply_recipe(model, config, tokenizer=tokenizer, progress=progress, callbacks=callbacks)
    return attach(model, config)


__all__ = ["UPQConfig", "UPQLinear", "UPQHfQuantizer", "quantize_model", "register", "__version__"]
