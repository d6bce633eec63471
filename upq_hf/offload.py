"""A model whose decoder blocks stay on disk: weights read from the checkpoint's safetensors files when a block
needs them and dropped after.

:class:`SafetensorsIndex` reads any tensor of a (sharded) safetensors checkpoint by itself with ``os.pread``
(no memory map: the file's pages stay in the kernel's page cache, which it can drop, and never count in the
process's resident memory). :func:`skeleton` builds the model from its config with every parameter on the meta
device, then loads what is not in a decoder block (embeddings, final norm, output head). :class:`BlockStore`
puts one block's weights in place (:meth:`~BlockStore.load`) and takes them out again
(:meth:`~BlockStore.release`); :meth:`~BlockStore.streaming` does both around every forward of every block, so
the skeleton runs ``generate`` or a plain forward as the dense model does, block after block, holding one block.

:func:`stream_problem` says why a checkpoint cannot be streamed (a ``.bin`` or GGUF source, tensor names that
transformers converts while loading, e.g. fused MoE experts), or None.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import find_decoder_layers

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class _Entry:
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsIndex:
    """Where each tensor of a safetensors checkpoint (one file or shards) lies; :meth:`read` one of them."""

    def __init__(self, entries: dict[str, _Entry]):
        self.entries = entries

    @classmethod
    def of_folder(cls, folder: str | os.PathLike) -> "SafetensorsIndex":
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no .safetensors file")
        entries: dict[str, _Entry] = {}
        for path in files:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            base = 8 + length
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which upq_hf cannot stream")
                start, end = info["data_offsets"]
                entries[name] = _Entry(str(path), _DTYPES[info["dtype"]], tuple(info["shape"]), base + start,
                                       base + end)
        return cls(entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def nbytes(self) -> int:
        return sum(e.end - e.start for e in self.entries.values())

    def dtype(self) -> torch.dtype:
        """The dtype of most of the checkpoint's floating bytes (the model's dtype as saved)."""
        sizes: dict[torch.dtype, int] = {}
        for entry in self.entries.values():
            if entry.dtype.is_floating_point:
                sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.end - entry.start
        return max(sizes, key=sizes.get) if sizes else torch.float32

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` as a new CPU tensor (cast to ``dtype`` if given)."""
        entry = self.entries[name]
        size = entry.end - entry.start
        buffer = bytearray(size)
        with open(entry.path, "rb", buffering=0) as handle:
            _read_exactly(handle.fileno(), memoryview(buffer), entry.start,
                          f"{entry.path} ends before tensor {name} does: the file is truncated")
        tensor = torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape) if size else \
            torch.empty(entry.shape, dtype=entry.dtype)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)


def _read_exactly(fd: int, view: memoryview, offset: int, truncated: str) -> None:
    """Fill ``view`` from file ``fd`` at ``offset`` (``pread``, as many calls as it takes); ``OSError(truncated)``
    where the file ends first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(truncated)
        done += got


def _local_folder(source: str) -> str | None:
    if os.path.isdir(source):
        return source
    try:  # a Hub id already in the local cache (no download here)
        from huggingface_hub import snapshot_download

        return snapshot_download(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a cached Hub id: not streamable
        return None


def _block_params(model: nn.Module) -> tuple[str, nn.ModuleList, dict[str, tuple[nn.Module, str]]]:
    name, layers = find_decoder_layers(model)
    owners = {}
    for index, block in enumerate(layers):
        for module_name, module in block.named_modules():
            for leaf, _ in module.named_parameters(recurse=False):
                owners[f"{name}.{index}.{module_name + '.' if module_name else ''}{leaf}"] = (module, leaf)
    return name, layers, owners


def stream_problem(source: str, config=None) -> str | None:
    """Why the checkpoint at ``source`` cannot be streamed block by block, or None where it can: a local folder
    (or a Hub id in the local cache) of safetensors files holding every parameter of the model under its own
    name and shape (what transformers loads without converting), decoder blocks of plain linear layers."""
    if config is not None and getattr(config, "rotation", None) not in (None, "auto"):  # "auto" streams unrotated
        return "a rotation of the residual stream (UPQConfig.rotation) is fused into the whole model at once"
    folder = _local_folder(source)
    if folder is None:
        return f"{source} is not a local folder or a Hub model in the local cache"
    if not any(Path(folder).glob("*.safetensors")):
        kinds = sorted({p.suffix for p in Path(folder).iterdir() if p.suffix in (".bin", ".gguf", ".pt", ".pth")})
        return f"{folder} holds no safetensors weights ({', '.join(kinds) or 'no weights found'})"
    try:
        index = SafetensorsIndex.of_folder(folder)
        model = skeleton(folder, load=False)
    except Exception as error:  # noqa: BLE001 - any reason makes the in-memory path the one to take
        return f"its architecture could not be built without weights ({type(error).__name__}: {error})"
    from . import adapters

    for name, param in model.named_parameters():
        entry = index.entries.get(name)
        if entry is None:
            return f"the model's parameter {name} is not in the checkpoint under that name (transformers converts " \
                   f"this family's weights while loading)"
        if entry.shape != tuple(param.shape):
            return f"{name} has shape {entry.shape} in the checkpoint and {tuple(param.shape)} in the model"
    if config is not None:
        for name, module in adapters.targets(model, config.modules_to_not_convert).items():
            if type(module) is not nn.Linear:
                return f"{name} is a {type(module).__name__}, not a plain linear layer"
    return None


def skeleton(source: str, dtype: torch.dtype | None = None, load: bool = True, shared: nn.Module | None = None,
             device: str | torch.device = "cpu"):
    """The model of ``source`` with its decoder blocks' parameters on the meta device and everything else (the
    embeddings, the final norm, the output head) read from the checkpoint in ``dtype`` (default: the
    checkpoint's). ``shared``: another skeleton of the same checkpoint whose non-block tensors this one takes
    without a copy (its normalisation layers excepted: those get their own, they train). ``load=False``: every
    parameter stays on the meta device. ``device``: where the loaded tensors go."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = _local_folder(source) or source
    config = AutoConfig.from_pretrained(folder)
    index = SafetensorsIndex.of_folder(folder) if load else None
    dtype = dtype or (index.dtype() if index is not None else torch.float32)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    model.name_or_path = folder
    model.config._name_or_path = folder
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    if not load:
        return model.eval()
    _, _, owners = _block_params(model)
    others = dict(shared.named_parameters(remove_duplicate=False)) if shared is not None else {}
    norms = {name for name, module in model.named_modules() if _is_norm(module)}
    for name, module in model.named_modules():
        for leaf, param in list(module.named_parameters(recurse=False)):
            full = f"{name}.{leaf}" if name else leaf
            if full in owners:
                continue
            if full in others and name not in norms:
                tensor = others[full].data
            elif full in index:
                tensor = index.read(full, dtype).to(device)
            else:
                continue  # tied to a tensor read under another name: tie_weights below
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in owners]
    if missing:
        raise ValueError(f"{folder}: {missing[0]} is not in the checkpoint")
    return model.eval()


def _is_norm(module: nn.Module) -> bool:
    from .distill import _is_norm as is_norm

    return is_norm(module)


def park(models, index: SafetensorsIndex) -> list:
    """Put the parameters of ``models`` that are neither in a decoder block nor a norm's (the embeddings, the output
    head) back on the meta device, to be read again by :func:`unpark`; returns what :func:`unpark` needs. Only
    tensors the checkpoint holds under their own name are parked (tied ones follow their source)."""
    parked = []
    for model in models:
        _, _, owners = _block_params(model)
        norms = {name for name, module in model.named_modules() if _is_norm(module)}
        for name, module in model.named_modules():
            if name in norms:
                continue
            for leaf, param in list(module.named_parameters(recurse=False)):
                full = f"{name}.{leaf}" if name else leaf
                if full in owners or full not in index or param.device.type == "meta":
                    continue
                parked.append((model, module, leaf, full, param.dtype, param.device))
                module._parameters[leaf] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                        requires_grad=False)
    for model in models:
        model.tie_weights()
    return parked


def unpark(parked: list, index: SafetensorsIndex) -> None:
    """Read back what :func:`park` parked: each tensor once per dtype and device, shared by the models again."""
    read: dict = {}
    for model, module, leaf, full, dtype, device in parked:
        key = (full, dtype, device)
        if key not in read:
            read[key] = index.read(full, dtype).to(device)
        module._parameters[leaf] = nn.Parameter(read[key], requires_grad=False)
    for model in dict.fromkeys(entry[0] for entry in parked):
        model.tie_weights()


class BlockStore:
    """The decoder blocks of a :func:`skeleton`, read from the checkpoint one at a time."""

    def __init__(self, source: str, model: nn.Module, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu"):
        folder = _local_folder(source) or source
        self.index = SafetensorsIndex.of_folder(folder)
        self.dtype = dtype or self.index.dtype()
        self.device = torch.device(device)
        self.model = model
        self.layers_name, self.layers, owners = _block_params(model)
        self.params = [{name: owner for name, owner in owners.items()
                        if name.startswith(f"{self.layers_name}.{i}.")} for i in range(len(self.layers))]
        model._upq_block_store = self  # weights_fingerprint reads the blocks through it

    @property
    def block_bytes(self) -> int:
        """The checkpoint's bytes of the largest block."""
        return max(sum(self.index.entries[n].end - self.index.entries[n].start for n in p) for p in self.params)

    def load(self, index: int, dtype: torch.dtype | None = None) -> nn.Module:
        """Block ``index`` with its weights read from the checkpoint (in ``dtype``, default the store's)."""
        for name, (module, leaf) in self.params[index].items():
            module._parameters[leaf] = nn.Parameter(self.index.read(name, dtype or self.dtype).to(self.device),
                                                    requires_grad=False)
        return self.layers[index]

    def release(self, index: int) -> None:
        """Block ``index``'s weights back to the meta device."""
        for module, leaf in self.params[index].values():
            param = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                    requires_grad=False)

    def forget(self, index: int) -> None:
        """Stop tracking block ``index``'s parameters (once the block's modules are replaced, as the student's are
        when quantized: the dense modules it held go with their last reference)."""
        self.params[index] = {}

    def read(self, name: str) -> torch.Tensor:
        """One block parameter as the checkpoint holds it, in the store's dtype."""
        return self.index.read(name, self.dtype)

    @contextlib.contextmanager
    def streaming(self):
        """Every block reads its weights before its forward and drops them after, while inside."""
        def before(index):
            return lambda *_: self.load(index) and None

        def after(index):
            return lambda *_: self.release(index)

        handles = []
        for index, block in enumerate(self.layers):
            handles.append(block.register_forward_pre_hook(before(index)))
            handles.append(block.register_forward_hook(after(index)))
        try:
            yield self.model
        finally:
            for handle in handles:
                handle.remove()


class DiskRows:
    """A ``(rows, ...)`` tensor kept in a file, read and written a few rows at a time with ``pread``/``pwrite``:
    block-wise PTQ's activation streams on the streaming path. Like :class:`SafetensorsIndex`, no memory map: the
    rows live in the kernel's page cache (dropped under pressure, never the process's resident memory) and only the
    rows of a step are in memory. Indexing takes an int, a slice with step 1 or a 1-D index tensor and returns a
    new CPU tensor; assignment takes a slice (or an int) and a tensor of the rows' shape; the values round-trip bit
    for bit."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype, create: bool = True):
        self.path, self.shape, self.dtype = str(path), tuple(int(s) for s in shape), dtype
        self.device = torch.device("cpu")
        self.row_numel = 1
        for size in self.shape[1:]:
            self.row_numel *= size
        self.row_bytes = self.row_numel * torch.empty((), dtype=dtype).element_size()
        if create:
            with open(self.path, "wb") as handle:
                handle.truncate(self.row_bytes * self.shape[0])
        self._fd = os.open(self.path, os.O_RDWR)

    @classmethod
    def of(cls, path: str | os.PathLike, tensor: torch.Tensor) -> "DiskRows":
        """A file holding ``tensor``'s rows."""
        rows = cls(path, tuple(tensor.shape), tensor.dtype)
        rows[:] = tensor
        return rows

    def like(self, path: str | os.PathLike, copy: bool = False) -> "DiskRows":
        """A file of the same shape and dtype at ``path``: zeros, or with ``copy`` these rows (a kernel-side copy:
        nothing passes through the process's memory)."""
        if copy:
            shutil.copyfile(self.path, path)
        return DiskRows(path, self.shape, self.dtype, create=not copy)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _span(self, key) -> tuple[int, int]:
        if isinstance(key, int):
            key = slice(key, key + 1) if key != -1 else slice(key, None)
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise IndexError("DiskRows takes slices with step 1")
        return start, max(start, stop)

    def _read(self, out: torch.Tensor, first: int) -> None:
        view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        _read_exactly(self._fd, view, first * self.row_bytes,
                      f"{self.path} ends before row {first + len(out) - 1}: the file is truncated")

    def __getitem__(self, key) -> torch.Tensor:
        if torch.is_tensor(key):
            index = key.reshape(-1).tolist()
            out = torch.empty((len(index),) + self.shape[1:], dtype=self.dtype)
            for position, row in enumerate(index):
                self._read(out[position], row % self.shape[0])
            return out
        start, stop = self._span(key)
        out = torch.empty((stop - start,) + self.shape[1:], dtype=self.dtype)
        self._read(out, start)
        return out[0] if isinstance(key, int) else out

    def __setitem__(self, key, value: torch.Tensor) -> None:
        start, stop = self._span(key)
        value = torch.as_tensor(value).to("cpu", self.dtype).expand((stop - start,) + self.shape[1:]).contiguous()
        view = memoryview(value.view(torch.uint8).numpy()).cast("B") if value.numel() else memoryview(b"")
        done, offset = 0, start * self.row_bytes
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def tensor(self) -> torch.Tensor:
        """Every row, in memory."""
        return self[:]
