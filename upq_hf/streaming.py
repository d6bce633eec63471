"""Quantize on load: round-to-nearest tensor by tensor while ``from_pretrained`` reads the checkpoint.

``from_pretrained(path, quantization_config=UPQConfig(recipe="rtn", ...))`` never holds the dense model:
before the weights load, the model is made canonical (:func:`upq_hf.convert.prepare`) and every linear to
quantize becomes a :class:`~upq_hf.nn.UPQLinear` shell; each dense tensor the checkpoint holds for them gets a
*float* placeholder under the checkpoint's own name and shape (:func:`prepare_on_load`: a layer's ``weight``, a
``Conv1D``'s transposed weight, the fused experts' 3-D parameters, a fused projection split by role). transformers
5 then hands each such tensor, as it is read (fused experts already merged by the family's conversions), to
:class:`UPQQuantizeOnLoad` (the quantizer's ``param_needs_quantization`` marks it and ``get_quantize_ops``
returns the op), which rounds it and returns the packed codes and scales of the layers it holds. Peak memory is the quantized model,
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

from collections.abc import Callable

from . import adapters, convert, formats, packing
from .nn import UPQLinear


def on_load_applies(config, pre_quantized: bool) -> bool:
    """Quantize while loading: a dense checkpoint and the round-to-nearest recipe (the only one that needs
    nothing but each weight by itself), unrotated (a rotation needs the whole model: it loads dense first)."""
    return not pre_quantized and config.recipe == "rtn" and getattr(config, "rotation", None) is None


def prepare_on_load(model: nn.Module, config) -> dict[str, Callable]:
    """Make ``model`` (on the meta device while ``from_pretrained`` builds it) canonical
    (:func:`upq_hf.convert.prepare`) and swap every linear to quantize for a ``UPQLinear`` shell; give each dense
    tensor the checkpoint holds for them a float placeholder under the checkpoint's own name, of its shape and the
    model's dtype (a ``Conv1D``'s transposed weight, the fused experts' 3-D parameters, a fused projection split
    by role). Returns ``{checkpoint tensor name: function}``, the function turning that tensor, as loaded, into
    the canonical model's tensors (``{name: tensor}``: packed codes and scales; a layer kept dense by
    ``modules_to_not_convert`` inside experts or a split projection gets its slice as it is). Raises before
    anything is swapped if a layer does not fit its format."""
    skip = config.modules_to_not_convert
    transposed = {name for name, m in adapters.targets(model, skip).items()
                  if adapters.is_conv1d(m)}  # the checkpoint holds these weights (in, out)
    layer_formats = convert.prepare(model, config)
    default = (config.bits, config.group_size)
    # the modules holding the matrices in the checkpoint's layout (a fused projection, the experts), in order
    sources = dict.fromkeys(unit.source for unit in adapters.units(model, skip).values())
    dtypes = {name: m.weight.dtype for name, m in convert.linear_layers(model, skip).items()}
    convert.empty_upq_model(model, config.bits, config.group_size, config.torch_scale_dtype, skip, config.backend,
                            layer_formats=layer_formats)
    modules = dict(model.named_modules())

    def tensors(layer: str, weight: torch.Tensor, transpose: bool = False) -> dict[str, torch.Tensor]:
        """The canonical tensors of ``layer`` from its dense weight ``(out, in)`` (``(in, out)`` if ``transpose``)."""
        weight = weight.t() if transpose else weight
        if not isinstance(modules[layer], UPQLinear):  # kept dense: as it is
            return {f"{layer}.weight": weight.contiguous()}
        bits, group_size = layer_formats.get(layer, default)
        packed = quantize_weight(weight, bits, group_size, config.rtn.scale_init, config.torch_scale_dtype,
                                 config.scale_grid)
        return {f"{layer}.{leaf}": tensor for leaf, tensor in packed.items()}

    def placeholder(layer: str, shape) -> torch.Tensor:
        """A float tensor of the model's dtype for ``layer``, where its module is (the meta device)."""
        module = modules[layer]
        return torch.empty(shape, dtype=dtypes.get(layer, module.weight.dtype), device=module.weight.device)

    conversions: dict[str, Callable] = {}
    for source in sources:
        container = modules.get(source)
        if isinstance(container, adapters.ExpertLinears):
            _expert_placeholders(container, source, modules, placeholder, tensors, conversions)
        elif isinstance(container, adapters.RoleSplitLinear):
            _role_placeholders(container, source, modules, placeholder, tensors, conversions, source in transposed)
        else:  # one layer; a Conv1D holds its weight transposed
            shell = modules[source]
            transpose = source in transposed
            shell.weight = placeholder(source, (shell.in_features, shell.out_features) if transpose
                                       else (shell.out_features, shell.in_features))
            conversions[f"{source}.weight"] = lambda weight, layer=source, t=transpose: tensors(layer, weight, t)
    return conversions


def _expert_placeholders(container, source: str, modules: dict, placeholder, tensors, conversions: dict) -> None:
    """The fused experts' 3-D parameters (and biases) as placeholders on the :class:`ExpertLinears`; each expert's
    slice goes to its own layer."""
    transposed = getattr(container, "is_transposed", False)
    for projection in container.projections:
        layers = [f"{source}.{e}.{projection}" for e in range(container.num_experts)]
        first = modules[layers[0]]
        shape = (first.in_features, first.out_features) if transposed else (first.out_features, first.in_features)
        container.register_parameter(projection, nn.Parameter(placeholder(layers[0], (len(layers), *shape)),
                                                              requires_grad=False))
        conversions[f"{source}.{projection}"] = lambda weight, layers=layers: {
            name: tensor for e, layer in enumerate(layers) for name, tensor in tensors(layer, weight[e], transposed).items()}
        if first.bias is not None:
            container.register_parameter(f"{projection}_bias", nn.Parameter(
                torch.empty(len(layers), first.out_features, dtype=first.bias.dtype, device=first.bias.device),
                requires_grad=False))
            conversions[f"{source}.{projection}_bias"] = (
                lambda bias, layers=layers: {f"{layer}.bias": bias[e] for e, layer in enumerate(layers)})


def _role_placeholders(container, source: str, modules: dict, placeholder, tensors, conversions: dict,
                       transpose: bool) -> None:
    """A fused projection split by role: its weight (and bias) as placeholders on the :class:`RoleSplitLinear`;
    each role's rows go to its own layer."""
    first = f"{source}.{container.roles[0]}"
    shape = (container.in_features, container.out_features) if transpose else \
        (container.out_features, container.in_features)
    container.register_parameter("weight", nn.Parameter(placeholder(first, shape), requires_grad=False))

    def split(weight):
        weight = weight.t() if transpose else weight
        return {name: tensor for role, index in container.rows.items()
                for name, tensor in tensors(f"{source}.{role}", weight[index]).items()}
    conversions[f"{source}.weight"] = split
    bias = modules[first].bias
    if bias is not None:
        container.register_parameter("bias", nn.Parameter(
            torch.empty(container.out_features, dtype=bias.dtype, device=bias.device), requires_grad=False))
        conversions[f"{source}.bias"] = lambda bias: {f"{source}.{role}.bias": bias[index]
                                                      for role, index in container.rows.items()}


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None, scale_init: str,
                    scale_dtype: torch.dtype, scale_grid: str | None = None) -> dict[str, torch.Tensor]:
    """The packed tensors of a ``UPQLinear`` (``weight``, ``weight_scale``, ``weight_zero`` for INT4) for a dense
    ``(out, in)`` weight: what ``UPQLinear.from_linear`` stores."""
    with torch.no_grad():
        qw = formats.quantize(weight.detach(), bits, group_size, scale_init, scale_dtype, scale_grid)
    out = {"weight": packing.pack_codes(qw.codes, bits), "weight_scale": qw.scale.t().contiguous()}
    if bits == 4:
        out["weight_zero"] = qw.zero.t().contiguous()
    return out


class UPQQuantizeOnLoad(ConversionOps):
    """transformers 5's per-tensor operation: one dense checkpoint tensor in (as the model's converters left it:
    fused experts already merged), the canonical model's tensors out, under their full names (see
    :func:`prepare_on_load`), and the placeholder emptied."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                **kwargs):
        if len(input_dict) != 1:
            raise ValueError(f"UPQ quantize-on-load expects one tensor at a time, got {sorted(input_dict)}")
        (key, value), = input_dict.items()
        value = value[0] if isinstance(value, (list, tuple)) else value
        conversions = self.hf_quantizer.on_load_layers
        name = full_layer_name if full_layer_name in conversions else key
        if name not in conversions:
            raise ValueError(f"UPQ quantize-on-load got {name}, which is not a tensor it quantizes")
        layer, _, leaf = name.rpartition(".")
        placeholder = getattr(model.get_submodule(layer), leaf) if model is not None else value
        # the tensor a dense load would have put in the layer: the model's dtype (a no-op where transformers
        # already cast it to the placeholder's dtype)
        tensor = value.to(placeholder.dtype) if placeholder.dtype.is_floating_point else value
        out = conversions[name](tensor)
        self.hf_quantizer.on_load_done.add(name)
        del tensor, value
        if name not in out:  # the placeholder of a container (experts, roles) is emptied, then removed after loading
            out[name] = torch.empty(0, dtype=placeholder.dtype)
        return out


def check_converted(model: nn.Module, conversions, done) -> None:
    """After loading: every dense tensor the layers to quantize need came from the checkpoint (``done``: the names
    the operation converted; a tensor the checkpoint lacked would leave a layer's codes empty, or a float
    placeholder in place); the containers' placeholders are removed."""
    missing = [name for name in conversions if name not in done]
    if missing:
        many = len(missing) != 1
        raise ValueError(f"UPQ quantize-on-load: {len(missing)} tensor{'s' if many else ''} to quantize "
                         f"{'are' if many else 'is'} not in the checkpoint (e.g. {missing[0]}): the checkpoint does "
                         f"not match the model's config")
    for name in conversions:
        layer, _, leaf = name.rpartition(".")
        module = model.get_submodule(layer)
        if not isinstance(module, UPQLinear) and leaf in module._parameters:
            del module._parameters[leaf]


def quantized_element_size(config) -> float:
    """Bytes per quantized weight (codes, scales, INT4 zero points), for transformers' memory estimates."""
    group = config.group_size or 4096
    per_group = config.torch_scale_dtype.itemsize * (2 if config.bits == 4 else 1)
    return config.bits / 8 + per_group / group
