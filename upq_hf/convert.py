"""Model surgery: find the linear layers to quantize, check them, swap them for ``UPQLinear``.

Knows nothing of transformers' loading machinery: it works on any ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import formats
from .nn import UPQLinear

DEFAULT_SKIPS = ("lm_head",)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def output_module_names(model: nn.Module) -> list[str]:
    """Names of the output embedding and of linears tied to an embedding: never quantized."""
    names = set(DEFAULT_SKIPS)
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if module is out or (isinstance(module, nn.Linear) and id(module.weight) in embedding_weights):
            names.add(name)
    return sorted(names)


def linear_layers(model: nn.Module, modules_to_not_convert: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers to quantize, by name, in model order."""
    skip = set(output_module_names(model)) | set(modules_to_not_convert or ())
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, UPQLinear) and not _skipped(name, skip)}


LayerFormats = dict  # {layer name: (bits, group_size)} for layers quantized otherwise than the default


def check_layers(layers: dict[str, nn.Module], group_size: int | None,
                 layer_formats: LayerFormats | None = None) -> None:
    """Validate every layer before touching any, so that nothing is half-converted. ``layer_formats``
    gives the layers whose format differs from the default (mixed bits, ``UPQConfig.layer_formats``)."""
    if not layers:
        raise ValueError("UPQ found no linear layer to quantize in this model (check modules_to_not_convert)")
    for name, module in layers.items():
        formats.check_group_size(module.in_features, _format(name, None, group_size, layer_formats)[1], layer=name)


def model_layer_formats(model: nn.Module, config) -> LayerFormats:
    """The mixed-precision layers of ``model`` under a ``UPQConfig`` (its ``module_bits`` patterns resolved
    against the layers it quantizes): ``{name: (bits, group_size)}``, empty when every layer takes the default."""
    if not config.sets_layers_apart:
        return {}
    return config.layer_formats(linear_layers(model, config.modules_to_not_convert))


def _format(name: str, bits, group_size, layer_formats: LayerFormats | None) -> tuple:
    return (layer_formats or {}).get(name, (bits, group_size))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def empty_upq_model(model: nn.Module, bits: int, group_size: int | None, scale_dtype: torch.dtype,
                    modules_to_not_convert: Iterable[str] | None = None, backend: str | None = None,
                    layer_formats: LayerFormats | None = None) -> list[str]:
    """Swap linears for empty ``UPQLinear`` shells (for loading a packed checkpoint). Returns the names."""
    layers = linear_layers(model, modules_to_not_convert)
    check_layers(layers, group_size, layer_formats)
    for name, linear in layers.items():
        layer_bits, layer_group = _format(name, bits, group_size, layer_formats)
        device = linear.weight.device
        bias_dtype = None if linear.bias is None else linear.bias.dtype
        shell = UPQLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=layer_bits,
                          group_size=layer_group, scale_dtype=scale_dtype, dtype=bias_dtype, device=device,
                          backend=backend)
        replace_module(model, name, shell)
    return list(layers)


def quantize_linears_rtn(model: nn.Module, bits: int, group_size: int | None, scale_init: str = "mse",
                         scale_dtype: torch.dtype = torch.float16,
                         modules_to_not_convert: Iterable[str] | None = None, backend: str | None = None,
                         progress: bool = False, layer_formats: LayerFormats | None = None) -> list[str]:
    """Round-to-nearest: replace each selected ``nn.Linear`` by its ``UPQLinear``, in place."""
    from tqdm.auto import tqdm

    layers = linear_layers(model, modules_to_not_convert)
    check_layers(layers, group_size, layer_formats)
    for name, linear in tqdm(layers.items(), desc=f"RTN INT{bits}", disable=not progress, unit="layer"):
        layer_bits, layer_group = _format(name, bits, group_size, layer_formats)
        replace_module(model, name, UPQLinear.from_linear(linear, layer_bits, layer_group, scale_init, scale_dtype,
                                                          backend))
    return list(layers)


def upq_layers(model: nn.Module) -> dict[str, UPQLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, UPQLinear)}


def dequantize_layers(model: nn.Module, dtype: torch.dtype = torch.float32, *,
                      weights: dict[str, torch.Tensor] | None = None,
                      dither: torch.Generator | None = None) -> list[str]:
    """Replace every ``UPQLinear`` by an ``nn.Linear`` holding its dequantized weight, in place.

    ``weights``: for the layers it names, that weight instead (e.g. the latent weights QAT left, which the
    packed codes round). ``dither``: add uniform noise of one quantization step (``U(-s/2, s/2)``, from this
    generator) to the dequantized weights, which keeps each weight in its own rounding cell but spreads
    the weights that sit exactly on a grid point. Re-quantizing to a coarser grid needs that: INT4's grid
    point 0 lies exactly on a SEQ INT2 decision boundary, where every such weight would round one way."""
    layers = upq_layers(model)
    for name, module in layers.items():
        if weights is not None and name in weights:
            weight = weights[name].to(module.weight.device, dtype)
        else:
            weight = module.dequantize(torch.float32)
            if dither is not None:
                step = formats._expand(module.weight_scale.t().float(), module.group_size, module.in_features)
                weight = weight + (torch.rand(weight.shape, generator=dither) - 0.5).to(weight.device) * step
            weight = weight.to(dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        replace_module(model, name, linear)
    return list(layers)
