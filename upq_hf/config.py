"""``UPQConfig``: what to quantize and how (validation and defaults, nothing else).

It is a ``transformers`` ``QuantizationConfigMixin`` so that it rides in ``config.json`` under
``quantization_config`` and is rebuilt by ``from_pretrained``; every attribute is JSON-serialisable.
"""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .packing import FORMAT_VERSION, SUPPORTED_BITS

RECIPES = ("rtn",)
SCALE_INITS = ("max", "mse")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
BACKENDS = (None, "torch", "triton")


class UPQConfig(QuantizationConfigMixin):
    """Configuration of a UPQ quantization.

    Args:
        bits: 2 (SEQ INT2, four levels ``(k - 1.5) * s``) or 4 (asymmetric INT4).
        group_size: input columns sharing one scale; ``None`` for one scale per output row.
        recipe: how the codes are found: ``"rtn"`` (round to nearest).
        scale_init: initial scales: ``"max"`` (max |w|, ParetoQ) or ``"mse"`` (error-minimising search).
        scale_dtype: storage dtype of scales and zero points.
        modules_to_not_convert: module names (or name suffixes) to keep in high precision; the output
            and tied embeddings are always kept.
        backend: force the ``"torch"`` or ``"triton"`` forward path (default: Triton on CUDA).
    """

    def __init__(self, bits: int = 2, group_size: int | None = 64, recipe: str = "rtn",
                 scale_init: str = "mse", scale_dtype: str = "float16",
                 modules_to_not_convert: list[str] | None = None, backend: str | None = None,
                 format_version: int = FORMAT_VERSION, **kwargs: Any):
        kwargs.pop("quant_method", None)
        self.quant_method = "upq"
        self.bits = bits
        self.group_size = group_size
        self.recipe = recipe
        self.scale_init = scale_init
        self.scale_dtype = scale_dtype
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.backend = backend
        self.format_version = format_version
        # keys written by a newer version are kept (and saved back) rather than dropped
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise ValueError(f"UPQConfig: bits must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0
        ):
            raise ValueError(
                f"UPQConfig: group_size must be a positive integer (e.g. 32, 64, 128) or None for one scale "
                f"per output row, got {self.group_size!r}"
            )
        if self.recipe not in RECIPES:
            raise ValueError(f"UPQConfig: recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"UPQConfig: scale_init must be one of {list(SCALE_INITS)}, got {self.scale_init!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"UPQConfig: scale_dtype must be one of {list(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"UPQConfig: backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.format_version, int) or self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses UPQ storage format version {self.format_version!r}, but the installed "
                f"upq_hf reads versions up to {FORMAT_VERSION}: upgrade upq_hf (pip install -U upq_hf)"
            )

    @property
    def torch_scale_dtype(self):
        import torch

        return getattr(torch, self.scale_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
