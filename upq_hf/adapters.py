"""How a model holds the weights UPQ quantizes: the one place that knows it.

UPQ quantizes matrices in ``nn.Linear`` orientation, ``(out_features, in_features)``. transformers' families
hold them in four ways, and each has an adapter here:

* ``nn.Linear`` and its subclasses (Falcon's ``FalconLinear``): as they are.
* GPT-2's ``Conv1D`` (GPT-2, GPT-Neo's relatives, ...): the weight is stored transposed, ``(in, out)``; it
  becomes an ``nn.Linear`` holding the transposed weight, the same function.
* Fused MoE experts: transformers 5 keeps every expert of a block in 3-D parameters (``gate_up_proj``
  ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``, or ``up_proj`` for experts without a gate; transposed where
  the class says ``is_transposed``). They become :class:`ExpertLinears`: one ``nn.Linear`` per expert and
  projection, named ``<experts>.<e>.<projection>``, so that each expert's matrices are quantized as their own
  rows and groups. The router stays in high precision.
* Fused projections whose rows have roles (Phi-3's ``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's, Falcon's and
  Bloom's ``query_key_value``, GPT-2's and GPT-BigCode's ``c_attn``): each role is a set of rows
  (:data:`ROLE_MAPS`). Where the roles take different formats (a mix keeps k/v at INT4), the layer becomes
  :class:`RoleSplitLinear`, one ``nn.Linear`` per role named like the unfused layers (``q_proj``, ``k_proj``,
  ``v_proj``, ``gate_proj``, ``up_proj``), its output put back in the original row order.

:func:`canonicalize` rewrites a model into that form in place, the forward pass the same function; every stage
(round to nearest, quantize on load, block-wise PTQ, QAT, saving, LoRA, the backends) then works on
``nn.Linear`` layers alone. :func:`units` lists the matrices canonicalize would produce, by the names they would
have, without touching the model (the checks that run before weights load). :func:`dense_decoder_weights` finds
the weights of the decoder blocks that would stay in high precision, and why, so that nothing is left dense
without a word.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: leaf names of the linear layers that route tokens to experts (kept in high precision, as the routers that are
#: not linear layers are): they count as routers when a sibling module holds experts
ROUTER_LEAVES = ("gate", "router", "shared_expert_gate")
#: the 3-D parameters of a fused experts module, in the order the forward pass uses them
EXPERT_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------- kinds

def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): a linear layer with its weight ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2 and hasattr(module, "nf")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: ``down_proj`` and ``gate_up_proj`` (or ``up_proj``) as 3-D parameters, of a
    class on transformers' experts interface (``use_experts_implementation``: it says whether the weights are
    transposed and how the gate applies). Another class with 3-D weights (Llama 4's) is not one UPQ knows."""
    params = module._parameters
    down = params.get("down_proj")
    up = params.get("gate_up_proj", params.get("up_proj"))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3 \
        and hasattr(module, "is_transposed") and hasattr(type(module), "_apply_gate")


def has_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds experts among its children (fused, split by :class:`ExpertLinears`, or a list)."""
    for name, child in module.named_children():
        if is_fused_experts(child) or isinstance(child, ExpertLinears) or (
                name == "experts" and isinstance(child, nn.ModuleList)):
            return True
    return False


def is_router(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """A module that routes tokens to experts: a class named ``...Router`` or a linear layer named like one
    (:data:`ROUTER_LEAVES`) beside experts."""
    if "router" in type(module).__name__.lower():
        return True
    return name.rpartition(".")[2] in ROUTER_LEAVES and parent is not None and has_experts(parent)


# ------------------------------------------------------------------------------------------------- roles

def _contiguous(sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    rows, start = {}, 0
    for role, size in sizes.items():
        rows[role] = torch.arange(start, start + size, device="cpu")
        start += size
    return rows


def _per_head(n_groups: int, roles: dict[str, int], head_dim: int) -> dict[str, torch.Tensor]:
    """Rows laid out as ``(n_groups, sum(roles), head_dim)``: each group holds ``roles[r]`` heads of each role."""
    width = sum(roles.values())
    grid = torch.arange(n_groups * width * head_dim, device="cpu").view(n_groups, width, head_dim)
    rows, start = {}, 0
    for role, count in roles.items():
        rows[role] = grid[:, start:start + count].reshape(-1)
        start += count
    return rows


def _heads(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _qkv_contiguous(config, out_features: int) -> dict[str, torch.Tensor]:
    heads, kv, head_dim = _heads(config)
    return _contiguous({"q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim})


def _gate_up(config, out_features: int) -> dict[str, torch.Tensor]:
    return _contiguous({"gate_proj": out_features // 2, "up_proj": out_features // 2})


def _qkv_per_head(config, out_features: int) -> dict[str, torch.Tensor]:
    heads = config.num_attention_heads
    return _per_head(heads, {"q_proj": 1, "k_proj": 1, "v_proj": 1}, out_features // (3 * heads))


def _falcon_qkv(config, out_features: int) -> dict[str, torch.Tensor]:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    if config.new_decoder_architecture:
        kv = config.num_kv_heads
        return _per_head(kv, {"q_proj": heads // kv, "k_proj": 1, "v_proj": 1}, head_dim)
    if config.multi_query:
        return _contiguous({"q_proj": heads * head_dim, "k_proj": head_dim, "v_proj": head_dim})
    return _per_head(heads, {"q_proj": 1, "k_proj": 1, "v_proj": 1}, head_dim)


def _bigcode_c_attn(config, out_features: int) -> dict[str, torch.Tensor]:
    heads, hidden = config.num_attention_heads, config.hidden_size
    if config.multi_query:
        return _contiguous({"q_proj": hidden, "k_proj": hidden // heads, "v_proj": hidden // heads})
    return _per_head(heads, {"q_proj": 1, "k_proj": 1, "v_proj": 1}, hidden // heads)


def _gpt2_c_attn(config, out_features: int) -> dict[str, torch.Tensor]:
    third = out_features // 3
    return _contiguous({"q_proj": third, "k_proj": third, "v_proj": third})


#: ``(model_type, layer leaf name) -> function(config, out_features) -> {role: row indices}`` for the fused
#: projections: the rows of each role, read from the family's attention/MLP code
ROLE_MAPS: dict[tuple[str, str], Callable] = {
    ("phi3", "qkv_proj"): _qkv_contiguous,
    ("phi3", "gate_up_proj"): _gate_up,
    ("gpt_neox", "query_key_value"): _qkv_per_head,
    ("bloom", "query_key_value"): _qkv_per_head,
    ("falcon", "query_key_value"): _falcon_qkv,
    ("gpt2", "c_attn"): _gpt2_c_attn,
    ("gpt_bigcode", "c_attn"): _bigcode_c_attn,
}


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or ""


def role_rows(model: nn.Module, name: str, out_features: int) -> dict[str, torch.Tensor] | None:
    """``{role: row indices}`` of the fused projection ``name`` of ``model``, or None where it has no roles. The
    rows of the roles partition the layer's rows (checked)."""
    function = ROLE_MAPS.get((_model_type(model), name.rpartition(".")[2]))
    if function is None:
        return None
    rows = function(model.config, out_features)
    every = torch.cat(list(rows.values())).sort().values
    if not torch.equal(every, torch.arange(out_features, device="cpu")):
        raise ValueError(f"UPQ: the roles {list(rows)} of {name} ({_model_type(model)}) do not cover its "
                         f"{out_features} output rows once each: this config's layout is not one UPQ knows")
    return rows


# ------------------------------------------------------------------------------------------------- units

@dataclass(frozen=True)
class Unit:
    """One matrix UPQ quantizes with one format: ``name`` is the ``nn.Linear`` it is (or becomes) in the
    canonical model, ``source`` the module that holds it in the family's own layout (itself for a linear
    layer), ``kind`` how (``"linear"``, ``"conv1d"``, ``"expert"``, ``"role"``)."""

    name: str
    source: str
    kind: str
    in_features: int
    out_features: int

    @property
    def names(self) -> tuple[str, ...]:
        """The names a ``module_bits`` pattern is matched against: a role part answers to its layer's name too."""
        return (self.name, self.source) if self.kind == "role" else (self.name,)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def output_module_names(model: nn.Module) -> list[str]:
    """Names of the output embedding and of linears tied to an embedding: never quantized."""
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if module is out or (isinstance(module, nn.Linear) and id(module.weight) in embedding_weights):
            names.add(name)
    return sorted(names)


def _parents(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()}


def is_quantized_layer(module: nn.Module) -> bool:
    """A layer UPQ made (``UPQLinear``, ``QATLinear``, the PTQ's trainable layers): it has ``bits`` and a
    ``weight_scale`` or clipping parameters. (Told by what it holds, so that this module imports none of them.)"""
    return hasattr(module, "bits") and (hasattr(module, "weight_scale") or hasattr(module, "clip_upper"))


def targets(model: nn.Module, modules_to_not_convert: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The modules UPQ quantizes, by name, in model order: linear layers (``Conv1D`` included) and fused experts;
    not the output embedding, the routers nor ``modules_to_not_convert``. Layers already quantized (a
    ``UPQLinear``) are not targets."""
    skip = set(output_module_names(model)) | set(modules_to_not_convert or ())
    modules = _parents(model)
    found = {}
    for name, module in modules.items():
        if is_quantized_layer(module) or _skipped(name, skip):
            continue
        if isinstance(module, nn.Linear) or is_conv1d(module) or is_fused_experts(module):
            if is_router(name, module, modules.get(name.rpartition(".")[0])):
                continue
            found[name] = module
    return found


def _expert_shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    """``{projection: (in_features, out_features)}`` of one expert of a fused experts module."""
    transposed = getattr(module, "is_transposed", False)
    shapes = {}
    for projection in EXPERT_PROJECTIONS:
        param = module._parameters.get(projection)
        if param is not None:
            rows, cols = param.shape[1:]
            shapes[projection] = (rows, cols) if transposed else (cols, rows)
    return shapes


def units(model: nn.Module, modules_to_not_convert: Iterable[str] | None = None) -> dict[str, Unit]:
    """Every matrix UPQ would quantize in ``model`` (family layout or canonical), by its canonical name."""
    modules = _parents(model)
    found = {}
    for name, module in targets(model, modules_to_not_convert).items():
        if is_fused_experts(module):
            first = next(p for p in (module._parameters.get(k) for k in EXPERT_PROJECTIONS) if p is not None)
            for expert in range(first.shape[0]):
                for projection, (k, n) in _expert_shapes(module).items():
                    unit = Unit(f"{name}.{expert}.{projection}", name, "expert", k, n)
                    found[unit.name] = unit
            continue
        k, n = module.weight.shape if is_conv1d(module) else (module.in_features, module.out_features)
        parent_name = name.rpartition(".")[0]
        grandparent = modules.get(parent_name.rpartition(".")[0])
        if isinstance(modules.get(parent_name), RoleSplitLinear):
            found[name] = Unit(name, parent_name, "role", k, n)
        elif isinstance(grandparent, ExpertLinears):
            found[name] = Unit(name, parent_name.rpartition(".")[0], "expert", k, n)
        elif (rows := role_rows(model, name, n)) is not None:
            for role, index in rows.items():
                found[f"{name}.{role}"] = Unit(f"{name}.{role}", name, "role", k, len(index))
        else:
            found[name] = Unit(name, name, "conv1d" if is_conv1d(module) else "linear", k, n)
    return found


# ------------------------------------------------------------------------------------------------- modules

class ExpertLinears(nn.Module):
    """A fused experts module split into one ``nn.Linear`` per expert and projection (``experts.3.down_proj``),
    with the forward pass of transformers' experts interface (``batched_mm`` / ``grouped_mm``): each token's
    top-k experts, the family's gate rule (``_apply_gate``) on ``gate_up_proj`` (or its activation on
    ``up_proj``), ``down_proj``, the optional post-expert norm, weighted by the router and summed. Only the
    experts some token is routed to run (a loop over the active experts).

    Built by :func:`canonicalize` from the family's module, whose non-tensor attributes (the gate rule's
    constants, the flags, its config) and sub-modules (activation, post-expert norm) it keeps; :meth:`fused`
    gives the family's module back."""

    def __init__(self, experts: nn.Module, layers: list[dict[str, nn.Module]]):
        super().__init__()
        internal = set(vars(nn.Module()))
        self._family = type(experts)
        self._family_keys = tuple(key for key, value in vars(experts).items()
                                  if key not in internal and not isinstance(value, (torch.Tensor, nn.Module)))
        self.__dict__.update({key: experts.__dict__[key] for key in self._family_keys})
        for key, child in experts.named_children():
            self.add_module(key, child)
        self.num_experts = len(layers)
        self.projections = tuple(layers[0])
        for index, projections in enumerate(layers):
            self.add_module(str(index), nn.ModuleDict(projections))

    def __getitem__(self, index: int) -> nn.ModuleDict:
        return self._modules[str(index)]

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._family._apply_gate(self, gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        gated = "gate_up_proj" in self.projections
        for index in hit:
            if index == self.num_experts:  # expert parallelism's sentinel: a slot no local expert takes
                continue
            position, tokens = torch.where(mask[index])
            expert = self[index]
            x = hidden_states[tokens]
            h = self._apply_gate(expert["gate_up_proj"](x)) if gated else self.act_fn(expert["up_proj"](x))
            h = expert["down_proj"](h)
            if getattr(self, "has_post_expert_norm", False):
                h = self.post_expert_norm(h)
            h = h * top_k_weights[tokens, position, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """The family's experts module with these experts' (dense) weights stacked into its 3-D parameters."""
        module = self._family.__new__(self._family)
        nn.Module.__init__(module)
        module.__dict__.update({key: self.__dict__[key] for key in self._family_keys})
        module.train(self.training)
        for key, child in self.named_children():
            if not key.isdigit():
                module.add_module(key, child)
        transposed = getattr(self, "is_transposed", False)
        for projection in self.projections:
            layers = [self[e][projection] for e in range(self.num_experts)]
            weights = torch.stack([(layer.weight.t() if transposed else layer.weight).detach() for layer in layers])
            module.register_parameter(projection, nn.Parameter(weights, requires_grad=layers[0].weight.requires_grad))
            if layers[0].bias is not None:
                module.register_parameter(f"{projection}_bias", nn.Parameter(
                    torch.stack([layer.bias.detach() for layer in layers]), requires_grad=layers[0].bias.requires_grad))
        return module


class RoleSplitLinear(nn.Module):
    """A fused projection split by role: one linear layer per role (``q_proj``, ``k_proj``, ``v_proj``) over that
    role's rows; the output is the fused layer's, rows in the original order."""

    def __init__(self, parts: dict[str, nn.Module], rows: dict[str, torch.Tensor], in_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(len(index) for index in rows.values())
        self.roles = tuple(parts)
        for role, part in parts.items():
            self.add_module(role, part)
        # plain attributes, not buffers: transformers re-creates a model's buffers empty while it loads weights
        self.rows = {role: rows[role].cpu() for role in self.roles}  # {role: its rows in the fused layer}
        concatenated = torch.cat(list(self.rows.values()))
        order = torch.empty_like(concatenated)  # output row r of the fused layer is row order[r] of the parts
        order[concatenated] = torch.arange(len(concatenated), device="cpu")
        self.order = None if torch.equal(order, torch.arange(len(order), device="cpu")) else order
        self._orders: dict = {}  # the order on each device the forward pass has run on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([getattr(self, role)(x) for role in self.roles], dim=-1)
        if self.order is None:
            return y
        order = self._orders.get(y.device)
        if order is None:
            order = self._orders[y.device] = self.order.to(y.device)
        return y.index_select(-1, order)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, roles={list(self.roles)}"


# ------------------------------------------------------------------------------------------------- rewriting

def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in ``model`` under the name ``name`` (``"model.layers.0.mlp"``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``(out, in)`` itself (meta tensors kept)."""
    n, k = weight.shape
    layer = nn.Linear(k, n, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=requires_grad)
    return layer


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a slice (nothing on the meta device): each layer owns its weight, so that the fused
    tensor is freed once split, and a layer kept dense computes as it does loaded from a checkpoint."""
    return tensor if tensor.is_meta else tensor.detach().clone(memory_format=torch.contiguous_format)


def _split_experts(module: nn.Module) -> ExpertLinears:
    transposed = getattr(module, "is_transposed", False)
    present = [p for p in EXPERT_PROJECTIONS if module._parameters.get(p) is not None]
    n_experts = module._parameters[present[0]].shape[0]
    layers = []
    for expert in range(n_experts):
        projections = {}
        for projection in present:
            param = module._parameters[projection]
            bias = module._parameters.get(f"{projection}_bias")
            projections[projection] = _linear(_own(param[expert].t() if transposed else param[expert]),
                                              None if bias is None else _own(bias[expert]), param.requires_grad)
        layers.append(projections)
    return ExpertLinears(module, layers)


def _split_roles(layer: nn.Linear, rows: dict[str, torch.Tensor]) -> RoleSplitLinear:
    parts = {}
    on_meta = layer.weight.is_meta
    for role, index in rows.items():
        weight = layer.weight.new_empty(len(index), layer.in_features) if on_meta else layer.weight[index]
        bias = None
        if layer.bias is not None:
            bias = layer.bias.new_empty(len(index)) if on_meta else layer.bias[index]
        parts[role] = _linear(weight, bias, layer.weight.requires_grad)
    return RoleSplitLinear(parts, rows, layer.in_features)


def _conv1d_as_linear(module: nn.Module) -> nn.Linear:
    weight = module.weight
    transposed = weight.new_empty(weight.shape[::-1]) if weight.is_meta else weight.detach().t().contiguous()
    return _linear(transposed, module.bias, weight.requires_grad)


def canonicalize(model: nn.Module, modules_to_not_convert: Iterable[str] | None = None,
                 format_of: Callable[[Unit], tuple] | None = None, split: Iterable[str] = ()) -> None:
    """Rewrite ``model`` in place so that every matrix UPQ quantizes is an ``nn.Linear`` named as :func:`units`
    names it: ``Conv1D`` as ``nn.Linear``, fused experts as :class:`ExpertLinears`, and a fused projection as a
    :class:`RoleSplitLinear` where ``format_of`` (``Unit -> (bits, group_size)``) gives its roles different
    formats or ``split`` names it (a checkpoint saved it split). Idempotent; meta tensors stay on the meta
    device (a model being built for loading)."""
    split = set(split)
    for name, module in targets(model, modules_to_not_convert).items():
        if is_fused_experts(module):
            replace_module(model, name, _split_experts(module))
            continue
        if is_conv1d(module):
            module = _conv1d_as_linear(module)
            replace_module(model, name, module)
        rows = role_rows(model, name, module.out_features) if format_of is not None or name in split else None
        if rows is None:
            continue
        part_formats = {format_of(Unit(f"{name}.{role}", name, "role", module.in_features, len(index)))
                        for role, index in rows.items()} if format_of is not None else set()
        if len(part_formats) > 1 or name in split:
            replace_module(model, name, _split_roles(module, rows))


def family_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of ``model``'s architecture as its family builds it (on the meta device, no weights):
    where :func:`canonicalize` changed a module, what it was. Empty for a model that is no transformers model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    import copy

    config = copy.copy(config)
    config.__dict__.pop("quantization_config", None)
    try:
        with torch.device("meta"):
            family = type(model)(config)
    except Exception:  # noqa: BLE001 - a model class that cannot be rebuilt from its config
        return {}
    return dict(family.named_modules())


def _dense_like(original: nn.Module | None, weight: torch.Tensor, bias: torch.Tensor | None,
                requires_grad: bool) -> nn.Module:
    """The family's own layer (``original``'s class: ``Conv1D``, ``FalconLinear``, ...) holding the dense ``(out,
    in)`` ``weight``; an ``nn.Linear`` where the family's layer is unknown."""
    if original is not None and is_conv1d(original):
        layer = type(original)(weight.shape[0], weight.shape[1])
        layer.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=requires_grad)
        layer.bias = nn.Parameter(bias.detach() if bias is not None else torch.zeros(weight.shape[0]),
                                  requires_grad=requires_grad)
        return layer
    layer = _linear(weight, bias, requires_grad)
    if isinstance(original, nn.Linear) and type(original) is not nn.Linear:
        layer.__class__ = type(original)  # FalconLinear and kin: nn.Linear's state, their own forward
    return layer


def refuse(model: nn.Module) -> None:
    """Put the family's layout back where :func:`canonicalize` changed it and the weights are dense again (after
    dequantizing): experts stacked into their 3-D parameters, split roles fused into one layer, ``Conv1D`` as
    ``Conv1D``: the dense model saves as its family's checkpoint."""
    family = family_modules(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, ExpertLinears) and all(
                isinstance(module[e][p], nn.Linear) for e in range(module.num_experts) for p in module.projections):
            replace_module(model, name, module.fused())
        elif isinstance(module, RoleSplitLinear) and all(
                isinstance(getattr(module, role), nn.Linear) for role in module.roles):
            first = getattr(module, module.roles[0])
            weight = first.weight.new_empty(module.out_features, module.in_features)
            bias = None if first.bias is None else first.bias.new_empty(module.out_features)
            for role, index in module.rows.items():
                part = getattr(module, role)
                weight[index] = part.weight.detach()
                if bias is not None:
                    bias[index] = part.bias.detach()
            replace_module(model, name, _dense_like(family.get(name), weight, bias, first.weight.requires_grad))
        elif type(module) is nn.Linear and is_conv1d(family.get(name)):
            replace_module(model, name, _dense_like(family[name], module.weight, module.bias,
                                                     module.weight.requires_grad))


def layout_version(model: nn.Module) -> int:
    """The storage format a UPQ checkpoint of ``model`` needs (:mod:`upq_hf.packing`): 2 where canonicalize changed
    the family's layout (experts, split roles, ``Conv1D``), else 1, which older upq_hf reads too."""
    if any(isinstance(m, (ExpertLinears, RoleSplitLinear)) for m in model.modules()):
        return 2
    return 2 if any(is_conv1d(m) for m in family_modules(model).values()) else 1


# ------------------------------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class DenseWeight:
    """A weight of a decoder block left in high precision: ``name`` (the parameter), ``module_type``, ``numel``
    and ``reason`` (``"router"``, ``"embedding"``, ``"modules_to_not_convert"``, or ``None``: no reason)."""

    name: str
    module_type: str
    numel: int
    reason: str | None


def _holds_weights(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_fused_experts(module) or \
        is_quantized_layer(module)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the ``nn.ModuleList`` holding the most parameters among those whose
    every element holds a linear layer (``nn.Linear``, ``Conv1D``, fused experts or a quantized layer):
    ``model.layers`` in Llama/Qwen/Mistral, ``transformer.h`` in GPT-2, ..."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(_holds_weights(m) for m in block.modules()) for block in module):
            continue
        size = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ValueError("found no list of decoder blocks (nn.ModuleList of modules with linear layers) in this model")
    return best


def decoder_prefix(model: nn.Module) -> str | None:
    """The name of the model's stack of decoder blocks (``model.layers``), or None where it has none."""
    try:
        return find_decoder_layers(model)[0]
    except ValueError:
        return None


def dense_decoder_weights(model: nn.Module, modules_to_not_convert: Iterable[str] | None = None) -> list[DenseWeight]:
    """The floating-point matrices (2-D and up) of the decoder blocks that are not quantized (a ``UPQLinear``) nor
    to be (:func:`targets`), each with the documented reason it stays dense, or ``None`` where there is none."""
    prefix = decoder_prefix(model)
    if prefix is None:
        return []
    skip = set(modules_to_not_convert or ())
    modules = _parents(model)
    wanted = set(targets(model, modules_to_not_convert))
    dense = []
    for name, module in modules.items():
        if not name.startswith(prefix + ".") or is_quantized_layer(module) or name in wanted:
            continue
        for leaf, param in module.named_parameters(recurse=False):
            if param.dim() < 2 or not param.is_floating_point():
                continue
            if _skipped(name, skip):
                reason = "modules_to_not_convert"
            elif is_router(name, module, modules.get(name.rpartition(".")[0])):
                reason = "router"
            elif isinstance(module, nn.Embedding):
                reason = "embedding"
            else:
                reason = None
            dense.append(DenseWeight(f"{name}.{leaf}", type(module).__name__, param.numel(), reason))
    return dense


def check_nothing_silently_dense(model: nn.Module, modules_to_not_convert: Iterable[str] | None = None) -> None:
    """Raise where a weight of a decoder block would stay in high precision without a documented reason (a module
    UPQ does not know how to quantize): naming its module type and the model's family."""
    unknown = [w for w in dense_decoder_weights(model, modules_to_not_convert) if w.reason is None]
    if unknown:
        kinds = sorted({w.module_type for w in unknown})
        family = _model_type(model) or type(model).__name__
        raise ValueError(
            f"UPQ does not know how to quantize {', '.join(kinds)} in this {family} model ({len(unknown)} "
            f"weight{'s' if len(unknown) != 1 else ''} of its decoder blocks, e.g. {unknown[0].name}): they would stay in high precision. Keep them so on purpose "
            f"with modules_to_not_convert=[{unknown[0].name.rpartition('.')[0].rpartition('.')[2]!r}], or open an "
            f"issue for this family")


def quantized_fraction(model: nn.Module) -> float:
    """The share of the decoder blocks' weights (floating matrices, 2-D and up) that are quantized: 1.0 when every
    one is a ``UPQLinear``; weights kept dense for a documented reason (routers) count against it."""
    from .nn import UPQLinear

    prefix = decoder_prefix(model)
    if prefix is None:
        return 0.0
    quantized = dense = 0
    for name, module in model.named_modules():
        if not name.startswith(prefix + "."):
            continue
        if isinstance(module, UPQLinear):
            quantized += module.in_features * module.out_features
            continue
        dense += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2 and p.is_floating_point())
    return quantized / max(1, quantized + dense)
