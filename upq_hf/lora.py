"""PEFT LoRA on top of ``UPQLinear``: train adapters on an INT2/INT4 model, codes frozen.

After ``import upq_hf`` the usual PEFT calls work on a UPQ model::

    import upq_hf
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(upq_model, LoraConfig(r=8, target_modules="all-linear"))  # or explicit names
    ...  # transformers.Trainer, model.save_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(int2_dir), adapter_dir)

Each targeted ``UPQLinear`` is wrapped in a :class:`UPQLoraLinear`: ``base(x)`` (the packed codes,
untouched) plus ``lora_B(lora_A(dropout(x))) * scaling`` for each active adapter, in the adapter's own
dtype (float32 by default) and cast back to the base output's dtype. Only the adapters train; the
packed ``weight``, ``weight_scale`` and ``weight_zero`` are buffers and stay bit-identical.

How it plugs into PEFT (peft 0.21). PEFT picks the LoRA layer for a module in
``LoraModel._create_new_module`` from a fixed list of ``dispatch_*`` functions (bnb, eetq, AQLM, AWQ,
GPTQ, HQQ, INC, torchao, Megatron, Transformer Engine, then the dense default); none of them can be
extended from outside. The one documented hook for other layer types is the experimental, per-config
``LoraConfig._register_custom_module({UPQLinear: UPQLoraLinear})``; it is not saved with the adapter,
so it would have to be repeated on every config, including the one ``PeftModel.from_pretrained``
reads from disk. Every entry point (``get_peft_model``, ``PeftModel.from_pretrained`` /
``load_adapter``, ``inject_adapter_in_model``, transformers' ``model.add_adapter`` /
``load_adapter``) builds its tuner from PEFT's method registry ``peft.PEFT_TYPE_TO_TUNER_MAPPING``.
:func:`register_peft` (run on ``import upq_hf``) points its LoRA entry at :class:`UPQLoraModel`, a
``LoraModel`` subclass that adds one dispatcher in front of PEFT's own (for ``UPQLinear`` bases only;
every other module goes to PEFT's dispatch unchanged), resolves ``"all-linear"`` to include the
``UPQLinear`` layers, and refuses to merge into packed weights before anything is touched. No PEFT
function or class is modified. :func:`unregister_peft` puts ``LoraModel`` back. Code that builds
``LoraModel(...)`` by hand can use the per-config route instead: ``register_peft(config)``.

Merging is refused on packed weights: adding a LoRA delta to INT2/INT4 codes means re-quantizing
them, which erases most of what the adapter learned. ``model.unload()`` drops the adapters; to
merge, dequantize first (``model.dequantize()`` swaps the ``UPQLinear`` bases for dense
``nn.Linear``), then ``merge_and_unload()`` works as for any dense model.

Supported: plain LoRA (rank/alpha patterns, rsLoRA, dropout, ``lora_bias``, init ``True``,
``False`` or ``"gaussian"``), several adapters, ``set_adapter``, ``disable_adapter()``, mixed-batch
``adapter_names``. Not supported on UPQ layers: LoRA variants (DoRA, aLoRA, ...) and initialisations
that read the base weight (PiSSA, OLoRA, LoftQ, CorDA, ...), which raise a clear error.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .convert import upq_layers
from .nn import UPQLinear

try:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
    from peft.utils import PeftType
except ImportError as _err:  # peft is a dependency of upq_hf; keep ``import upq_hf`` alive without it
    _PEFT_IMPORT_ERROR: ImportError | None = _err
else:
    _PEFT_IMPORT_ERROR = None


class UPQMergeError(ValueError):
    """Raised when LoRA weights would be merged into packed UPQ codes."""


def merge_error_message(layer: str | None = None, bits: int | None = None) -> str:
    fmt = f"INT{bits}" if bits else "INT2/INT4"
    where = f" (layer {layer!r})" if layer else ""
    return (
        f"Cannot merge LoRA into UPQ {fmt} weights{where}: merging would re-quantize them to {fmt} and lose the "
        "adapter's precision. The adapter runs on top of the packed weights as it is; save it with "
        "model.save_pretrained(adapter_dir). To drop the adapters use model.unload(). To get a merged dense model, "
        "dequantize first: model.base_model.model.dequantize() (or model.dequantize() on the PeftModel), then "
        "model.merge_and_unload()."
    )


def target_modules(model: nn.Module) -> list[str]:
    """The leaf names of the model's ``UPQLinear`` layers (e.g. ``["down_proj", "gate_proj", ...]``), for
    ``LoraConfig(target_modules=...)``. Layers already wrapped by PEFT count under their own name."""
    names = set()
    for name in upq_layers(model):
        name = name.removesuffix(".base_layer")
        names.add(name.rpartition(".")[2])
    return sorted(names)


def upq_module_names(model: nn.Module) -> list[str]:
    """Full names of the ``UPQLinear`` layers not yet inside a PEFT tuner layer."""
    tuner_prefixes = tuple(name + "." for name, m in model.named_modules() if _is_tuner_layer(m))
    return [name for name in upq_layers(model) if not name.startswith(tuner_prefixes)]


def _is_tuner_layer(module: nn.Module) -> bool:
    return _PEFT_IMPORT_ERROR is None and isinstance(module, BaseTunerLayer)


if _PEFT_IMPORT_ERROR is None:

    class UPQLoraLinear(nn.Module, LoraLayer):
        """LoRA on a ``UPQLinear`` (or, after ``dequantize()``, on the dense ``nn.Linear`` that replaced it)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:
            if config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True does not apply to UPQLinear (weights are (out, in)); "
                              "setting fan_in_fan_out to False.")
                config.fan_in_fan_out = False
            super().__init__()
            LoraLayer.__init__(self, base_layer, **kwargs)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        # ------------------------------------------------------------------ set-up
        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
            try:
                return super().resolve_lora_variant(config=config, **kwargs)
            except ValueError as err:
                raise ValueError(
                    "LoRA on UPQ layers supports plain LoRA only: LoRA variants (DoRA, aLoRA, VeLoRA, ...) need the "
                    f"dense base weight, which a UPQLinear does not keep ({err}). Use use_dora=False and no variant "
                    "options, or dequantize the model first (model.dequantize())."
                ) from err

        def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
            init = config.init_lora_weights
            if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
                raise ValueError(
                    f"init_lora_weights={init!r} reads or rewrites the base weight, which a UPQLinear stores as packed "
                    "INT2/INT4 codes; use init_lora_weights=True (default), False or 'gaussian' on UPQ layers."
                )
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        # ------------------------------------------------------------------ forward
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            if adapter_names is not None:
                return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            if self.merged:
                return result
            out_dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                h = self._cast_input_dtype(x, lora_A.weight.dtype)
                result = result + lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
            return result.to(out_dtype)

        # ------------------------------------------------------------------ merging
        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            """``scaling * B @ A``, ``(out_features, in_features)``, in float32."""
            a = self.lora_A[adapter].weight.float()
            b = self.lora_B[adapter].weight.float()
            return (b @ a) * self.scaling[adapter]

        def _refuse_if_packed(self) -> nn.Module:
            base = self.get_base_layer()
            if isinstance(base, UPQLinear):
                raise UPQMergeError(merge_error_message(self.kwargs.get("target_name"), base.bits))
            return base

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            """Refused on a ``UPQLinear`` base (see :func:`merge_error_message`); on a dequantized (dense)
            base, adds the adapters' deltas to its weight (and bias with ``lora_bias``)."""
            base = self._refuse_if_packed()
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                weight = base.weight.data.float() + self.get_delta_weight(name).to(base.weight.device)
                bias = None
                if self.lora_bias[name]:
                    if base.bias is None:
                        raise RuntimeError("Cannot merge a LoRA adapter with lora_bias=True into a layer without bias.")
                    bias = base.bias.data.float() + self.lora_B[name].bias.float() * self.scaling[name]
                if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.weight.data = weight.to(base.weight.dtype)
                if bias is not None:
                    base.bias.data = bias.to(base.bias.dtype)
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            """Refused on a ``UPQLinear`` base (nothing can have been merged into it); on a dense base,
            subtracts the merged adapters' deltas again."""
            base = self._refuse_if_packed()
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name not in self.lora_A:
                    continue
                base.weight.data = (base.weight.data.float() - self.get_delta_weight(name).to(base.weight.device)
                                    ).to(base.weight.dtype)
                if self.lora_bias[name]:
                    base.bias.data = (base.bias.data.float() - self.lora_B[name].bias.float() * self.scaling[name]
                                      ).to(base.bias.dtype)

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    def dispatch_upq(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module | None:
        """PEFT-style dispatcher: a :class:`UPQLoraLinear` for a ``UPQLinear`` target, else ``None``.

        A mapping the user registered on the config with ``_register_custom_module`` for ``UPQLinear``
        takes precedence (PEFT's own dispatch handles it)."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, UPQLinear) or kwargs.get("parameter_name") is not None:
            return None
        if any(isinstance(base, key) for key in (getattr(config, "_custom_modules", None) or {})):
            return None
        return UPQLoraLinear(target, adapter_name, config=config, **kwargs)

    class UPQLoraModel(LoraModel):
        """PEFT's ``LoraModel`` that also knows ``UPQLinear`` layers (see the module docstring)."""

        @staticmethod
        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            new_module = dispatch_upq(target, adapter_name, config=lora_config, **kwargs)
            if new_module is None:
                new_module = LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)
            return new_module

        def _prepare_model(self, peft_config, model: nn.Module):
            super()._prepare_model(peft_config, model)
            _include_upq_in_all_linear(peft_config, model)

        def _check_merge_allowed(self):
            # before anything is merged, so that a refused merge_and_unload leaves the model as it was
            super()._check_merge_allowed()
            for name, module in self.model.named_modules():
                if isinstance(module, UPQLoraLinear) and isinstance(module.get_base_layer(), UPQLinear):
                    raise UPQMergeError(merge_error_message(name, module.get_base_layer().bits))

    def _include_upq_in_all_linear(peft_config, model: nn.Module) -> None:
        """``target_modules="all-linear"`` -> PEFT's own choice of linear layers plus the ``UPQLinear`` ones.

        PEFT resolves ``"all-linear"`` by ``isinstance(m, (nn.Linear, Conv1D))``, which a ``UPQLinear``
        is not; this runs just before (from ``_prepare_model``) with PEFT's resolver, then adds ours."""
        spec = getattr(peft_config, "target_modules", None)
        if not (isinstance(spec, str) and spec.lower() == "all-linear"):
            return
        ours = upq_module_names(model)
        if not ours:
            return
        try:
            from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
        except ImportError as err:  # private helper moved: ask for explicit names rather than guess
            raise ValueError(
                "This PEFT version cannot resolve target_modules='all-linear' for UPQ models; pass explicit names, "
                f"e.g. LoraConfig(target_modules=upq_hf.lora.target_modules(model)) -> {target_modules(model)}"
            ) from err
        _maybe_include_all_linear_layers(peft_config, model)
        peft_config.target_modules = set(peft_config.target_modules) | set(ours)


def _require_peft() -> None:
    if _PEFT_IMPORT_ERROR is not None:
        raise ImportError("LoRA on UPQ models needs peft (pip install 'peft>=0.21')") from _PEFT_IMPORT_ERROR


def register_peft(config=None):
    """Teach PEFT's LoRA about ``UPQLinear`` (idempotent; run by ``import upq_hf``).

    Without argument: point PEFT's LoRA registry entry at :class:`UPQLoraModel`, which every PEFT
    entry point uses (``get_peft_model``, ``PeftModel.from_pretrained``, ``load_adapter``,
    ``inject_adapter_in_model``, transformers' ``add_adapter``). If another library already put its
    own class there, it is left alone with a warning; use the per-config route then.

    With a ``LoraConfig``: register :class:`UPQLoraLinear` on that config through PEFT's experimental
    ``_register_custom_module`` (not saved with the adapter: repeat it on the config you reload with,
    ``PeftModel.from_pretrained(model, path, config=register_peft(LoraConfig.from_pretrained(path)))``).
    Returns the config.
    """
    if config is not None:
        _require_peft()
        config._register_custom_module({UPQLinear: UPQLoraLinear})
        return config
    if _PEFT_IMPORT_ERROR is not None:
        return None  # nothing to register with
    current = PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.LORA)
    if current is UPQLoraModel:
        return None
    if current is not LoraModel:
        warnings.warn(f"PEFT's LoRA tuner is already replaced by {current!r}; upq_hf leaves it alone. Register UPQ "
                      "layers per config instead: upq_hf.lora.register_peft(lora_config).")
        return None
    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] = UPQLoraModel
    return None


def unregister_peft() -> None:
    """Undo :func:`register_peft`: PEFT's LoRA goes back to its own ``LoraModel``."""
    if _PEFT_IMPORT_ERROR is None and PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.LORA) is UPQLoraModel:
        PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] = LoraModel


if _PEFT_IMPORT_ERROR is None:
    register_peft()

__all__ = ["UPQLoraLinear", "UPQLoraModel", "UPQMergeError", "dispatch_upq", "register_peft", "unregister_peft",
           "target_modules", "upq_module_names", "merge_error_message"]
