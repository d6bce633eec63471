"""Model surgery: find the layers to quantize, check them, swap them for ``UPQLinear``.

Knows nothing of transformers' loading machinery: it works on any ``nn.Module``. How a model holds its weights
(``Conv1D``, fused experts, fused projections with roles) is :mod:`upq_hf.adapters`' business: :func:`prepare`
rewrites a model into its canonical form, where every matrix to quantize is an ``nn.Linear``, and the rest of this
module works on those.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import adapters, formats
from .adapters import _skipped, output_module_names, replace_module  # noqa: F401 - imported from here too
from .nn import UPQLinear


def linear_layers(model: nn.Module, modules_to_not_convert: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers to quantize, by name, in model order (of a canonical model, :func:`prepare`: in
    another, the ``Conv1D`` layers and fused experts are not among them)."""
    return {name: module for name, module in adapters.targets(model, modules_to_not_convert).items()
            if isinstance(module, nn.Linear)}


LayerFormats = dict  # {layer name: (bits, group_size)} for layers quantized otherwise than the default


def check_layers(layers: dict[str, nn.Module], group_size: int | None,
                 layer_formats: LayerFormats | None = None) -> None:
    """Validate every layer (anything with ``in_features``: a module or an :class:`upq_hf.adapters.Unit`) before
    touching any, so that nothing is half-converted. ``layer_formats`` gives the layers whose format differs from
    the default (mixed bits, ``UPQConfig.layer_formats``)."""
    if not layers:
        raise ValueError("UPQ found no linear layer to quantize in this model (check modules_to_not_convert)")
    for name, module in layers.items():
        formats.check_group_size(module.in_features, _format(name, None, group_size, layer_formats)[1], layer=name)


def model_layer_formats(model: nn.Module, config) -> LayerFormats:
    """The mixed-precision layers of ``model`` under a ``UPQConfig`` (its ``module_bits`` patterns resolved
    against the matrices it quantizes, :func:`upq_hf.adapters.units`): ``{name: (bits, group_size)}``, empty when
    every layer takes the default. The names are those of the canonical model: a fused projection whose roles
    all take one format is one layer (that format); one whose roles differ is one layer per role. The same
    before and after :func:`prepare`."""
    if not config.sets_layers_apart:
        return {}
    found = adapters.units(model, config.modules_to_not_convert)
    layer_formats = config.layer_formats(found)
    default = (config.bits, config.group_size)
    roles: dict[str, list[str]] = {}
    for unit in found.values():
        if unit.kind == "role":
            roles.setdefault(unit.source, []).append(unit.name)
    for source, parts in roles.items():
        part_formats = {layer_formats.get(part, default) for part in parts}
        if len(part_formats) == 1:  # the layer stays whole and takes its roles' format
            for part in parts:
                layer_formats.pop(part, None)
            if (fmt := part_formats.pop()) != default:
                layer_formats[source] = fmt
    return layer_formats


def prepare(model: nn.Module, config, split=()) -> LayerFormats:
    """Before quantizing ``model`` under ``config``: refuse a model with decoder weights UPQ cannot quantize
    (:func:`upq_hf.adapters.check_nothing_silently_dense`), rewrite it into its canonical form
    (:func:`upq_hf.adapters.canonicalize`: ``Conv1D`` as ``nn.Linear``, experts one linear layer each, fused
    projections split where their roles' formats differ or ``split`` names them) and check every layer against its
    format. Returns the layer formats (:func:`model_layer_formats`). Idempotent; works on the meta device."""
    adapters.check_nothing_silently_dense(model, config.modules_to_not_convert)
    layer_formats = model_layer_formats(model, config)
    _canonical(model, config.bits, config.group_size, config.modules_to_not_convert, layer_formats, split)
    layers = linear_layers(model, config.modules_to_not_convert)
    check_layers(layers, config.group_size, layer_formats)
    if config.scale_grid is not None:
        from .formats import Q2_K_SUPER

        off_grid = [name for name, layer in layers.items() if _format(name, config.bits, None, layer_formats)[0] == 2
                    and layer.in_features % Q2_K_SUPER]
        if off_grid:
            raise ValueError(f"UPQConfig(scale_grid={config.scale_grid!r}) needs INT2 rows whose length is a multiple "
                             f"of {Q2_K_SUPER}: {off_grid[0]} has {layers[off_grid[0]].in_features} inputs (keep it "
                             f"at INT4 with module_bits, or leave scale_grid unset)")
    return layer_formats


def check_before_loading(model: nn.Module, config) -> None:
    """On the model as transformers builds it (meta device, the family's layout) before its weights load: what
    :func:`prepare` will refuse, refused now, without changing the model."""
    adapters.check_nothing_silently_dense(model, config.modules_to_not_convert)
    layer_formats = model_layer_formats(model, config)
    default = (config.bits, config.group_size)
    found = adapters.units(model, config.modules_to_not_convert)
    # a fused projection left whole has its format under its own name (the source of its role units)
    check_layers(found, config.group_size, {name: layer_formats.get(name, layer_formats.get(unit.source, default))
                                            for name, unit in found.items()})


def check_quantized(model: nn.Module, config) -> None:
    """After quantizing: no layer UPQ was to quantize is left in high precision, and no decoder weight without a
    documented reason (:func:`upq_hf.adapters.check_nothing_silently_dense`)."""
    left = adapters.targets(model, config.modules_to_not_convert)
    if left:
        name, module = next(iter(left.items()))
        raise ValueError(f"UPQ left {len(left)} layers in high precision that it was to quantize (e.g. {name}, a "
                         f"{type(module).__name__})")
    adapters.check_nothing_silently_dense(model, config.modules_to_not_convert)


def _format(name: str, bits, group_size, layer_formats: LayerFormats | None) -> tuple:
    return (layer_formats or {}).get(name, (bits, group_size))


def _canonical(model: nn.Module, bits, group_size, modules_to_not_convert, layer_formats: LayerFormats | None,
               split=()) -> None:
    adapters.canonicalize(model, modules_to_not_convert, split=split,
                          format_of=lambda unit: _format(unit.name, bits, group_size, layer_formats))


def empty_upq_model(model: nn.Module, bits: int, group_size: int | None, scale_dtype: torch.dtype,
                    modules_to_not_convert: Iterable[str] | None = None, backend: str | None = None,
                    layer_formats: LayerFormats | None = None, canonical: bool = True) -> list[str]:
    """Swap linears for empty ``UPQLinear`` shells (for loading a packed checkpoint), the model made canonical
    first (:func:`upq_hf.adapters.canonicalize`) unless ``canonical`` is False (a format-1 checkpoint: its
    ``nn.Linear`` layers alone). Returns the names."""
    if canonical:
        _canonical(model, bits, group_size, modules_to_not_convert, layer_formats)
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
                         progress: bool = False, layer_formats: LayerFormats | None = None,
                         canonical: bool = True, scale_grid: str | None = None) -> list[str]:
    """Round-to-nearest: replace each selected ``nn.Linear`` by its ``UPQLinear``, in place (the model made
    canonical first, :func:`upq_hf.adapters.canonicalize`, unless ``canonical`` is False: its ``nn.Linear`` layers
    alone, as storage format 1 knew them)."""
    from tqdm.auto import tqdm

    if canonical:
        _canonical(model, bits, group_size, modules_to_not_convert, layer_formats)
    layers = linear_layers(model, modules_to_not_convert)
    check_layers(layers, group_size, layer_formats)
    for name, linear in tqdm(layers.items(), desc=f"RTN INT{bits}", disable=not progress, unit="layer"):
        layer_bits, layer_group = _format(name, bits, group_size, layer_formats)
        replace_module(model, name, UPQLinear.from_linear(linear, layer_bits, layer_group, scale_init, scale_dtype,
                                                          backend, scale_grid))
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
