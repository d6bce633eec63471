"""Recipes: the ways of turning a dense model into a UPQ model, as compositions of the stages.

``rtn``: round to nearest (no data).
"""

from __future__ import annotations

from torch import nn

from . import convert
from .config import UPQConfig


def apply_recipe(model: nn.Module, config: UPQConfig, tokenizer=None, progress: bool = False) -> nn.Module:
    """Quantize ``model`` in place following ``config.recipe``; returns the model."""
    if config.recipe == "rtn":
        convert.quantize_linears_rtn(model, config.bits, config.group_size, config.scale_init,
                                     config.torch_scale_dtype, config.modules_to_not_convert, config.backend,
                                     progress=progress)
        return model
    raise ValueError(f"unknown recipe {config.recipe!r}")
