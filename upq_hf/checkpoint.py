"""Checks on a packed UPQ checkpoint before its tensors are loaded.

transformers re-initialises a tensor whose shape does not match and only warns, which for packed
codes means a silently broken model. Before loading, every ``UPQLinear`` tensor expected by the
model is looked up in the safetensors headers (no tensor data is read) and any missing, misshapen
or unreadable entry raises one ``ValueError`` that names the file and the layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .packing import FORMAT_VERSION


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
