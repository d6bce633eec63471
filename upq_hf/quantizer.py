"""The transformers glue: ``UPQHfQuantizer`` and its registration under ``quant_method="upq"``.

Thin by design: it checks the environment, swaps modules before a packed checkpoint loads, quantizes
tensor by tensor while a dense checkpoint loads with the round-to-nearest recipe (:mod:`upq_hf.streaming`:
no dense copy of the model is ever held), and runs the other recipes after a dense checkpoint loads. The
work lives in :mod:`upq_hf.convert`, :mod:`upq_hf.streaming` and :mod:`upq_hf.recipes`. Also here:
:func:`quantize_model` (a model already in memory, with the per-run settings) and :func:`attach` (mark a model
quantized).
"""

from __future__ import annotations

import json

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from . import convert, head, recipes, streaming
from .adapters import layout_version
from .chat import contiguous_head_input
from .checkpoint import IN_FEATURES_KEY, checkpoint_keys, expected_upq_tensors, split_sources, validate_checkpoint
from .config import UPQConfig
from .packing import FORMAT_VERSION
from .publish import install_card_hooks, remove_card_hooks

QUANT_METHOD = "upq"


class UPQHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: UPQConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.quantization_config = quantization_config
        # the dense tensors quantized as they load: {checkpoint name: function to the canonical model's tensors}
        self.on_load_layers: dict[str, object] = {}
        self.on_load_done: set[str] = set()  # the names the quantize operation has converted

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("UPQ does not support offloading layers to disk: remove 'disk' from device_map")
        if not self.pre_quantized:
            self.quantization_config.check_backend()  # a GPU-only backend without a GPU
        elif self.quantization_config.backend == "triton":
            from .backends import triton_available

            if not triton_available():
                raise ImportError("UPQConfig(backend='triton') needs Triton (pip install triton)")
        elif self.quantization_config.backend in ("avx2", "a8"):
            from .models import check_backend

            backend = self.quantization_config.backend
            check_backend(backend, f"UPQConfig(backend={backend!r})", "use backend='cpu' or 'torch'")
        if self.quantization_config.backend == "cpu":
            from .backends import cpu_kernel_available

            if not cpu_kernel_available():
                raise ImportError("UPQConfig(backend='cpu') needs torch.ops.aten._weight_int4pack_mm_for_cpu, "
                                  "which this torch build lacks or cannot run: use backend='torch'")

    def update_dtype(self, dtype):
        return dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        """The float weights of the layers quantized on load (recipe ``rtn``); everything else loads as it is
        (the other recipes run after loading)."""
        return not self.pre_quantized and param_name in self.on_load_layers

    def get_quantize_ops(self):
        return streaming.UPQQuantizeOnLoad(self)

    @property
    def quantized_element_size(self):
        return streaming.quantized_element_size(self.quantization_config) if self.on_load_layers else None

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            files = kwargs.get("checkpoint_files") or []
            if config.format_version < 2:  # version 1 knew nn.Linear alone, saved in the family's layout
                layer_formats = convert.model_layer_formats(model, config)
            else:
                split = split_sources(checkpoint_keys(files), model, config.modules_to_not_convert)
                layer_formats = convert.prepare(model, config, split=split)
            convert.empty_upq_model(model, config.bits, config.group_size, config.torch_scale_dtype,
                                    config.modules_to_not_convert, config.backend, layer_formats=layer_formats,
                                    canonical=config.format_version >= 2)
            if files:
                validate_checkpoint(files, expected_upq_tensors(model))
        elif streaming.on_load_applies(config, self.pre_quantized):
            self.on_load_layers = streaming.prepare_on_load(model, config)
        else:  # fail before spending time on loading weights
            convert.check_before_loading(model, config)
        return model

    def update_weight_conversions(self, weight_conversions, *args, **kwargs):
        """A UPQ checkpoint of format 2 holds the tensors under the model's own names (:func:`attach`): none of the
        family's conversions (merging per-expert tensors, renaming) applies to it. Format 1 was saved in the
        family's layout, and a dense checkpoint quantized on load keeps the conversions too: the quantize operation
        sees each tensor as the model holds it (experts merged)."""
        if self.pre_quantized and self.quantization_config.format_version >= 2:
            return []
        return super().update_weight_conversions(weight_conversions, *args, **kwargs)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.on_load_layers:
            streaming.check_converted(model, self.on_load_layers, self.on_load_done)
        elif not self.pre_quantized:
            recipes.apply_recipe(model, self.quantization_config, recipes.Run(progress=True))
        if not self.pre_quantized:
            self.quantization_config.format_version = layout_version(model)
        if self.quantization_config.format_version >= 2:
            model._weight_conversions = []  # saved under the model's own names (see attach)
        install_card_hooks(model)
        contiguous_head_input(model)  # a bf16 head in generate's first step (upq_hf.chat)
        head.install(model, self.quantization_config.backend)  # int8 under the a8 backend
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True  # the Triton path is a torch.library custom op with a fake implementation

    def get_state_dict_and_metadata(self, model):
        # in_features is recorded because the packed shape cannot tell it (K = 90 and K = 96 pack alike)
        return None, {"upq_format_version": str(self.quantization_config.format_version),
                      IN_FEATURES_KEY: json.dumps({name: m.in_features for name, m in convert.upq_layers(model).items()})}

    def _dequantize(self, model, dtype=None):
        from .adapters import refuse

        convert.dequantize_layers(model, dtype or torch.float32)
        refuse(model)
        head.remove(model)
        remove_card_hooks(model)  # a dense model again: it saves without the UPQ model card
        model.__dict__.pop("_weight_conversions", None)  # and in its family's checkpoint layout
        return model


def attach(model: nn.Module, config: UPQConfig) -> nn.Module:
    """Mark a model quantized in place (outside ``from_pretrained``) so that ``save_pretrained`` works."""
    model.hf_quantizer = UPQHfQuantizer(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = config
    config.format_version = layout_version(model)
    if config.format_version >= 2:
        # save_pretrained would map the tensors back to the family's checkpoint layout (per-expert tensors, old
        # names) through its conversions: format 2 keeps the model's own names, which no conversion touches
        model._weight_conversions = []
    install_card_hooks(model)
    contiguous_head_input(model)
    head.install(model, config.backend)
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "to_dict"):
            module.config._is_quantized = True
    return model


def quantize_model(model, config: UPQConfig, tokenizer=None, *, device=None, work_dir: str | None = None,
                   resume: bool = False, keep_int4: str | None = None, progress: bool = True, callbacks=None):
    """Quantize an already-loaded dense model in place following ``config`` and mark it quantized, so that
    ``save_pretrained``/``push_to_hub`` write a UPQ checkpoint. Returns the model.

    The per-run settings, never saved: ``tokenizer`` (default: the model's own); ``device``, where the work runs
    (default: where the model is); ``work_dir``, where the training stages keep trainer checkpoints (None: not
    kept), and ``resume``, continue from the last complete one; ``keep_int4``, where ``upq`` keeps its INT4 stage
    (a later run with the same settings restarts from it); ``callbacks`` (``transformers.TrainerCallback``) reach
    the trainer of the training stages."""
    recipes.apply_recipe(model, config, recipes.Run(tokenizer, device, work_dir, resume, keep_int4, progress,
                                                    callbacks))
    return attach(model, config)


def register() -> None:
    """Register ``quant_method="upq"`` with transformers (idempotent)."""
    from transformers.quantizers.auto import register_quantization_config, register_quantizer

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not UPQConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(UPQConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not UPQHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(UPQHfQuantizer)
