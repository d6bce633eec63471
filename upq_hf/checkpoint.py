"""Checks on a packed UPQ checkpoint before its tensors are loaded.

transformers re-initialises a tensor whose shape does not match and only warns, which for packed
codes means a silently broken model. Before loading, every ``UPQLinear`` tensor expected by the
model is looked up in the safetensors headers (no tensor data is read) and any missing, misshapen
or unreadable entry raises one ``ValueError`` that names the file and the layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import torch

from .adapters import ROUTER_LEAVES
from .packing import FORMAT_VERSION


_BLOCK = re.compile(r"\.\d+\.")  # a key inside a numbered decoder block ("model.layers.3.mlp...")

#: safetensors header key holding ``{layer: in_features}`` of the packed layers (JSON)
IN_FEATURES_KEY = "upq_in_features"


class CorruptCheckpointError(ValueError):
    pass


def expected_upq_tensors(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from .nn import UPQLinear

    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, UPQLinear):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                expected[f"{name}.{buffer_name}"] = (tuple(buffer.shape), buffer.dtype)
    return expected


def checkpoint_keys(files: Iterable[str]) -> set[str]:
    """The tensor names in the safetensors files among ``files`` (headers only); unreadable files are left to
    :func:`validate_checkpoint` to report."""
    from safetensors import safe_open

    keys: set[str] = set()
    for path in files:
        if str(path).endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys.update(handle.keys())
            except Exception:  # noqa: BLE001 - validate_checkpoint names the damage
                continue
    return keys


def split_sources(keys: set[str], model: torch.nn.Module, modules_to_not_convert=None) -> set[str]:
    """The fused projections of ``model`` that a checkpoint with tensors ``keys`` holds split by role
    (``...qkv_proj.k_proj.weight``): whether one was split is the checkpoint's to say, not the config's (the INT4
    stage of ``upq`` splits as the INT2 mix does, at one format)."""
    from .adapters import units

    return {unit.source for unit in units(model, modules_to_not_convert).values()
            if unit.kind == "role" and f"{unit.name}.weight" in keys}


def validate_checkpoint(files: Iterable[str], expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                version = (handle.metadata() or {}).get("upq_format_version")
                if version is not None and int(version) > FORMAT_VERSION:
                    raise CorruptCheckpointError(
                        f"{path} uses UPQ storage format {version}; this upq_hf reads up to {FORMAT_VERSION}: "
                        "upgrade upq_hf")
                for key in handle.keys():
                    if key in expected:
                        tensor_slice = handle.get_slice(key)
                        found[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype(), str(path))
        except CorruptCheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise CorruptCheckpointError(f"corrupt UPQ checkpoint file {path}: {error}") from error
    problems = []
    for key, (shape, dtype) in expected.items():
        if key not in found:
            problems.append(f"{key}: missing")
            continue
        got_shape, got_dtype, path = found[key]
        codes_not_int32 = dtype == torch.int32 and got_dtype != "I32"  # float scales may be cast on load
        if got_shape != shape or codes_not_int32:
            problems.append(f"{key}: {got_dtype}{list(got_shape)} in {path}, expected {str(dtype)[6:]}{list(shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CorruptCheckpointError(
            f"corrupt or incompatible UPQ checkpoint ({len(problems)} packed tensors do not match the "
            f"quantization_config in config.json): {shown}")


def _linear_in_features(path: str) -> dict[str, int]:
    """``{name: in_features}`` of the linear layers of the model config.json describes, built on the meta
    device (no weights); empty when transformers cannot build it."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - an architecture this transformers cannot build
        return {}
    return {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _complete_layers(layers: dict, resolved, recorded: dict, path: str) -> None:
    """Each packed layer's ``bits`` (the tensors say it: only INT4 stores zero points) and ``in_features`` (recorded
    in the header, else groups x group size, else the architecture's)."""
    architecture = None
    for layer, entry in layers.items():
        _, group_size = resolved.layer_format(layer)
        entry["bits"] = 4 if "weight_zero_bytes" in entry else 2
        if layer in recorded:  # written by save_pretrained since the header records it
            entry["in_features"] = recorded[layer]
        elif group_size and entry["groups"] > 1:  # K = groups x group size exactly
            entry["in_features"] = entry["groups"] * group_size
        else:  # one scale per row: the packed words only bound K, the architecture knows it
            architecture = _linear_in_features(path) if architecture is None else architecture
            entry["in_features"] = architecture.get(layer, entry["packed_words"] * 32 // entry["bits"])


def _decoder_share(layers: dict, block_dense: dict[str, int]) -> tuple[float, dict]:
    """The share of the decoder blocks' weights that are quantized, and the block matrices left dense with their
    reason (``"router"``: a gate/router layer beside quantized experts; None: no documented reason)."""
    in_blocks = sum(e["in_features"] * e["out_features"] for name, e in layers.items() if _BLOCK.search(name + "."))
    with_experts = {key.split(".experts.")[0] for key in layers if ".experts." in key}
    dense = {}
    for key in block_dense:
        module, _, _ = key.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        dense[key] = "router" if parent in with_experts and leaf in ROUTER_LEAVES else None
    return in_blocks / max(1, in_blocks + sum(block_dense.values())), dense


def checkpoint_info(path: str) -> dict:
    """What a saved UPQ checkpoint holds, read from config.json and the safetensors headers (and, for a
    per-row layer of a checkpoint that predates the recorded ``in_features``, the architecture)."""
    import os

    from safetensors import safe_open

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a saved model folder (no config.json)")
    with open(config_path) as handle:
        config = json.load(handle)
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "upq":
        raise ValueError(f"{path} is not a UPQ checkpoint (quantization_config: {qconfig.get('quant_method')!r})")
    from .config import UPQConfig

    resolved = UPQConfig(**qconfig)  # resolves module_bits patterns to each layer's format
    element_bytes = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "U8": 1, "I8": 1}
    layers: dict[str, dict] = {}
    block_dense: dict[str, int] = {}  # floating matrices of the decoder blocks left dense: {key: weights}
    recorded: dict[str, int] = {}
    other_bytes = 0
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        try:
            handle = safe_open(os.path.join(path, name), framework="pt")
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise CorruptCheckpointError(f"corrupt UPQ checkpoint file {os.path.join(path, name)}: {error}") from None
        with handle:
            recorded.update(json.loads((handle.metadata() or {}).get(IN_FEATURES_KEY, "{}")))
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                shape, dtype = tensor_slice.get_shape(), tensor_slice.get_dtype()
                nbytes = element_bytes.get(dtype, 4)
                for dim in shape:
                    nbytes *= dim
                layer, _, leaf = key.rpartition(".")
                if leaf == "weight" and dtype == "I32":
                    entry = layers.setdefault(layer, {})
                    entry["out_features"] = shape[1]
                    entry["packed_words"] = shape[0]
                    entry["code_bytes"] = nbytes
                elif leaf in ("weight_scale", "weight_zero"):
                    entry = layers.setdefault(layer, {})
                    entry["groups"] = shape[0]
                    entry[f"{leaf}_bytes"] = nbytes
                else:
                    other_bytes += nbytes
                    if len(shape) >= 2 and dtype in ("F16", "BF16", "F32") and _BLOCK.search(key):
                        block_dense[key] = nbytes // element_bytes[dtype]
    quantized_bytes = sum(e.get("code_bytes", 0) + e.get("weight_scale_bytes", 0) + e.get("weight_zero_bytes", 0)
                          for e in layers.values())
    _complete_layers(layers, resolved, recorded, path)
    n_weights = sum(entry["in_features"] * entry["out_features"] for entry in layers.values())
    share, dense = _decoder_share(layers, block_dense)
    disk_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                     if os.path.isfile(os.path.join(path, f)))
    return {
        "path": path,
        "quantization_config": qconfig,
        "layers": layers,
        "quantized_weights": n_weights,
        "quantized_bytes": quantized_bytes,
        "other_tensor_bytes": other_bytes,
        "bits_per_weight": 8 * quantized_bytes / max(n_weights, 1),
        # the decoder blocks' weights: the share quantized, and those left dense ({key: reason or None})
        "decoder_quantized_fraction": share,
        "decoder_dense_weights": dense,
        "disk_bytes": disk_bytes,
    }
