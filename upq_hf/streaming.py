"""Quantize on load: round-to-nearest tensor by tensor while ``from_pretrained`` reads the checkpoint.

``from_pretrained(path, quantization_config=UPQConfig(recipe="rtn", ...))`` never holds the dense model:
before the weights load, every linear to quantize becomes a :class:`~upq_hf.nn.UPQLinear` shell whose
``weight`` is a *float* placeholder of the dense shape (:func:`prepare_on_load`); transformers 5 then
hands each float weight, as it is read, to :class:`UPQQuantizeOnLoad` (the quantizer's
``param_needs_quantization`` marks it and ``get_quantize_ops`` returns the op), which rounds it and
returns the packed codes and scales that replace the placeholder. Peak memory is the quantized model,
the unquantized tensors (embeddings, norms, biases) and one dense layer being converted.

Why a float placeholder: transformers 5.0-5.22 cast the checkpoint tensor to the placeholder's dtype
before the op runs; an int32 placeholder would truncate the weights. A float placeholder in the model's
dtype makes that cast the very cast a dense load does, so the op sees the same tensor a dense
``from_pretrained`` would have put in the ``nn.Linear``, and quantizing on load is bit for bit the same
as loading dense and then quantizing (``convert.quantize_linears_rtn``), mixed precision included (each
layer's format is ``UPQConfig.layer_format`` of its name, resolved once against the model's layers).

The recipes that need the dense model (``ptq``, ``upq``, ``ntp``, ``distill``: calibration data flows
through the unquantized blocks, or the unquantized model is the teacher) keep loading it dense and
quantize after loading.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps

from . import convert, formats, packing
from .nn import UPQLinear


def on_load_applies(config, pre_quantized: bool) -> bool:
    """Quantize while loading: a dense checkpoint and the round-to-nearest recipe (the only one that needs
    nothing but each weight by itself)."""
    return not pre_quantized and config.recipe == "rtn"


def prepare_on_load(model: nn.Module, config) -> dict[str, tuple[int, int | None]]:
    """Swap every linear to quantize for a ``UPQLinear`` shell with a float ``weight`` placeholder of the dense
    shape and dtype (on the meta device while ``from_pretrained`` builds the model). Returns
    ``{layer name: (bits, group_size)}`` of every swapped layer. Raises before anything is swapped if a
    layer does not fit its format."""
    layers = convert.linear_layers(model, config.modules_to_not_convert)
    layer_formats = convert.model_layer_formats(model, config)
    convert.check_layers(layers, config.group_size, layer_formats)
    swapped = {}
    for name, linear in layers.items():
        bits, group_size = layer_formats.get(name, (config.bits, config.group_size))
        weight = linear.weight
        shell = UPQLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                          group_size=group_size, scale_dtype=config.torch_scale_dtype,
                          dtype=None if linear.bias is None else linear.bias.dtype, device=weight.device,
                          backend=config.backend)
        shell.weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # the float placeholder
        convert.replace_module(model, name, shell)
        swapped[name] = (bits, group_size)
    return swapped


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None, scale_init: str,
                    scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The packed tensors of a ``UPQLinear`` (``weight``, ``weight_scale``, ``weight_zero`` for INT4) for a dense
    ``(out, in)`` weight: what ``UPQLinear.from_linear`` stores."""
    with torch.no_grad():
        qw = formats.quantize(weight.detach(), bits, group_size, scale_init, scale_dtype)
    out = {"weight": packing.pack_codes(qw.codes, bits), "weight_scale": qw.scale.t().contiguous()}
    if bits == 4:
        out["weight_zero"] = qw.zero.t().contiguous()
    return out


class UPQQuantizeOnLoad(ConversionOps):
    """transformers 5's per-tensor quantize operation: one float ``<layer>.weight`` in, that layer's packed
    ``weight``, ``weight_scale`` (and ``weight_zero``) out, under their full names."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                **kwargs):
        if len(input_dict) != 1:
            raise ValueError(f"UPQ quantize-on-load expects one weight per layer, got {sorted(input_dict)}")
        (key, value), = input_dict.items()
        value = value[0] if isinstance(value, (list, tuple)) else value
        name = key if key.endswith(".weight") else (full_layer_name or key)
        layer = name.removesuffix(".weight")
        formats_ = self.hf_quantizer.on_load_layers
        if layer not in formats_:
            raise ValueError(f"UPQ quantize-on-load got {name}, which is not a layer it quantizes")
        bits, group_size = formats_[layer]
        placeholder = model.get_submodule(layer).weight if model is not None else value
        # the tensor a dense load would have put in the nn.Linear: the model's dtype (a no-op where
        # transformers already cast it to the placeholder's dtype)
        weight = value.to(placeholder.dtype) if placeholder.dtype.is_floating_point else value
        config = self.hf_quantizer.quantization_config
        packed = quantize_weight(weight, bits, group_size, config.scale_init, config.torch_scale_dtype)
        del weight, value
        return {f"{layer}.{leaf}": tensor for leaf, tensor in packed.items()}


def check_converted(model: nn.Module, layers) -> None:
    """After loading: every shell holds packed codes; a weight the checkpoint lacked would otherwise be left
    as a randomly initialised float placeholder."""
    missing = [name for name in layers if model.get_submodule(name).weight.dtype != torch.int32]
    if missing:
        raise ValueError(f"UPQ quantize-on-load: {len(missing)} layers got no weight from the checkpoint "
                         f"(e.g. {missing[0]}): the checkpoint does not match the model's config")


def quantized_element_size(config) -> float:
    """Bytes per quantized weight (codes, scales, INT4 zero points), for transformers' memory estimates."""
    group = config.group_size or 4096
    per_group = config.torch_scale_dtype.itemsize * (2 if config.bits == 4 else 1)
    return config.bits / 8 + per_group / group
