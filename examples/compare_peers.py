"""Peer 2-bit methods on the bundled model, scored exactly as upq_hf scores its own checkpoints.

    python examples/compare_peers.py [--methods hqq,autoround,gptq] [--split validation|report] [--limit N]
                                     [--nsamples 128] [--seqlen 128] [--iters 200] [--dtype float32]
                                     [--bits 2] [--upq CHECKPOINT ...] [--threads N] [--json out.json]

    python examples/compare_peers.py --methods hqq,autoround,gptq,dense --json peers.json   # upq_hf's budget
    python examples/compare_peers.py --nsamples 8 --seqlen 64 --iters 2 --prompts 16 --limit 6   # a smoke test

Each method quantizes a fresh copy of the bundled SmolLM2-135M-Instruct (float32 safetensors), every ``nn.Linear``
of the decoder blocks (7 x 30 = 210 layers; the tied embedding / output layer stays dense, as upq_hf keeps it), at 2
bits (``--bits 4``: the same at 4 bits, a check of this script's plumbing: each method should then come close to dense):

* ``hqq``: HQQ (``pip install hqq``), 2 bits, groups of 64 along the input, its own API
  (``BaseQuantizeConfig(nbits=2, group_size=64)`` and ``HQQLinear``, axis 1, the half-quadratic optimizer on).
  HQQ needs no calibration data: it never sees it. Scale and zero point are stored in float16 (HQQ's default
  ``compute_dtype``), one each per group.
* ``autoround``: AutoRound (``pip install auto-round``), W2G64 (``bits=2, group_size=64``, ``sym`` its
  default: symmetric), SignRound for ``--iters`` steps per block (200, its default), on upq_hf's calibration
  sequences; exported in its own ``auto_round`` format (GPTQ packing: int32 codes, float16 scales, packed
  zero points).
* ``gptq``: GPTQ through GPTQModel (``pip install gptqmodel``), ``QuantizeConfig(bits=2, group_size=64)`` (sym,
  no act-order, GAR, damp 0.05: its defaults; ``offload_to_disk=False``, the model being small), on the same
  calibration sequences. The layers ``quantize()`` leaves hold their zero points in GPTQ's v1 storage convention,
  which GPTQModel's Torch kernel does not read: the model is saved (GPTQ format: int32 codes, float16 scales,
  packed zero points, ``g_idx``) and loaded back through its CPU inference path (``BACKEND.TORCH``, float16 so that
  the scales stay as stored; its ``torch.compile`` of the dequantization is undone: compiling per shape was slower).
* ``dense``: the unquantized model through the same path: a control (top-1 1, KL 0, the teacher's own count of
  answers on topic), which also shows that importing the peers (which patch transformers) changed nothing.
* ``--upq PATH``: a saved upq_hf checkpoint, scored the same way (its bits per weight from
  :func:`upq_hf.checkpoint.checkpoint_info`; no quantization time).

Calibration is upq_hf's default (``upq_hf.recipes._calibration`` with ``DataConfig``'s defaults): dataset
``"self"``, the teacher's own greedy answers to the built-in prompts, packed into ``--nsamples`` x ``--seqlen``
token blocks with seed 0 (generated once, then cached on disk). The peers get those token blocks themselves,
each with an all-ones attention mask, as upq_hf's block-wise PTQ sees them.

Scoring is ``examples/bench_backends.py``'s: the unquantized float32 model (the teacher) answers the split's
held-out prompts greedily once (:class:`~upq_hf.evaluation.FidelityReference`); each model is then run
teacher-forced on prompt + teacher answer (:func:`~upq_hf.evaluation.fidelity`, one prompt a call): top-1
agreement, KL(teacher || model) and JSD on the answer tokens; then it answers the prompts itself
(:func:`~upq_hf.evaluation.answer_texts`, greedy, 64 tokens, 8 prompts a batch) and the teacher counts the answers
on topic (:func:`~upq_hf.evaluation.topicality`). Every scored model is the float32 (``--dtype``) bundled model
whose 210 block layers are the method's quantized layers, run by the method's own modules where they run on a CPU:
``HQQLinear`` (PyTorch backend; its float16 scales and zeros cast to ``--dtype``, exact for float32) and
GPTQModel's ``TorchLinear``. AutoRound's CPU kernel computes in float16/bfloat16 only, so its exported codes,
scales and zero points are dequantized here into the layers' weights (checked against AutoRound's own in-memory
fake-quantized weights). Embeddings and norms are the teacher's float32 tensors in every peer's row, so the rows
differ only in the quantized layers (a ``--upq`` checkpoint keeps its own, as it saved them: bfloat16 by default).
AutoRound (``amp``) and GPTQModel (``dtype="auto"``) both quantize in bfloat16 on a CPU with native bf16, their
defaults, as upq_hf's PTQ autocasts to bf16 there.

Bits per weight: 8 x (bytes of the codes + scales + zero points that the method stores for the quantized layers)
/ (their number of weights), with each tensor at its stored dtype and packing, read from the layers
(HQQ, GPTQ) or from the exported safetensors (AutoRound). Tensors a method stores besides (GPTQ's ``g_idx``:
one int32 per input column of each layer) are in ``bpw_all`` in the JSON, not in the table. upq_hf's
INT2 g64 stores a float16 scale per group and no zero point: 2 + 16/64 = 2.25.

Time: wall seconds of the quantization alone (HQQ: quantizing the layers; AutoRound: ``quantize()`` and the
export that packs the layers; GPTQ: ``quantize()``, which packs, not the save and reload for scoring), not loading
the model nor building the calibration data.
Peak RSS: the process's peak resident memory while quantizing (the kernel's high-water mark, reset before each
method through ``/proc/self/clear_refs``); it includes what the process already holds (the teacher, the
calibration data): ``rss_before_mib`` in the JSON.

The peers are not dependencies of upq_hf and this script is not part of the package: install them in a separate
virtual environment, e.g.::

    python3 -m venv /tmp/peers-venv
    /tmp/peers-venv/bin/pip install torch==2.13.0 transformers==5.25.0 accelerate datasets peft gguf safetensors tqdm
    # upq_hf from its source tree, without writing into it (or: pip install --no-deps -e /path/to/repo)
    printf '%s\\n' /path/to/repo /path/to/repo/kernels > /tmp/peers-venv/lib/python3.11/site-packages/upq_hf_src.pth
    DISABLE_CUDA=1 /tmp/peers-venv/bin/pip install hqq auto-round
    # GPTQModel 7.7 asks for torch>=2.14.1 (from PyPI: a CUDA build) but runs its CPU path on 2.13: its other
    # requirements with torch pinned, then itself without dependencies (its sdist installs without compiling)
    /tmp/peers-venv/bin/pip install -c <(echo torch==2.13.0) threadpoolctl packaging device-smi protobuf pillow \\
        requests pypcre tokenicer logbar ninja maturin pyarrow dill torchao defuser
    /tmp/peers-venv/bin/pip install --no-deps gptqmodel

A method whose package is missing or that fails is reported on one line with the reason, in the table's notes
and in the JSON, and the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import upq_hf
from upq_hf.atomic import write_text
from upq_hf.evaluation import FidelityReference, answer_texts, decode_answers, fidelity, topicality
from upq_hf.models import bundled_model_dir, load_model, load_tokenizer
from upq_hf.prompts import REPORT_PROMPTS, VALIDATION_PROMPTS
from upq_hf.stages import DataConfig

SPLITS = {"report": REPORT_PROMPTS, "validation": VALIDATION_PROMPTS}
METHODS = ("hqq", "autoround", "gptq", "dense")
PACKAGES = {"hqq": "hqq", "autoround": "auto-round", "gptq": "gptqmodel"}
GROUP_SIZE = 64


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here (not installed, or no CPU path): the reason, on one line."""


@dataclass
class Storage:
    """Bytes a method stores for its quantized layers, by kind, and the number of weights they hold."""

    codes: int = 0
    scales: int = 0
    zeros: int = 0
    other: int = 0
    weights: int = 0
    layers: int = 0
    dtypes: dict = field(default_factory=dict)

    def add(self, kind: str, tensor: torch.Tensor, name: str = "") -> None:
        nbytes = tensor.numel() * tensor.element_size()
        setattr(self, kind, getattr(self, kind) + nbytes)
        self.dtypes.setdefault(name or kind, str(tensor.dtype).replace("torch.", ""))

    def summary(self) -> dict:
        n = max(self.weights, 1)
        return {"bpw": 8 * (self.codes + self.scales + self.zeros) / n,
                "bpw_all": 8 * (self.codes + self.scales + self.zeros + self.other) / n,
                "bits_codes": 8 * self.codes / n, "bits_scales": 8 * self.scales / n, "bits_zeros": 8 * self.zeros / n,
                "bits_other": 8 * self.other / n, "quantized_layers": self.layers, "quantized_weights": self.weights,
                "stored_dtypes": self.dtypes}


@dataclass
class Quantized:
    model: nn.Module  # the float model whose block layers are the method's
    storage: Storage | None
    seconds: float | None
    details: dict = field(default_factory=dict)
    peak_rss_mib: float | None = None  # at the end of the quantization (before building the scored model)


# ------------------------------------------------------------------------------------------------- helpers

def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` of the decoder blocks (``model.layers.N.*``): what each method quantizes."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def fresh_model(dtype: str) -> nn.Module:
    return load_model(bundled_model_dir(), dtype=dtype).eval()


@contextlib.contextmanager
def stdout_to_stderr():
    """What the peers print (GPTQModel's banner and logs go to stdout) goes to stderr, at the file descriptor, so
    that stdout holds the table alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def working_directory(path: str):
    """``contextlib.chdir`` (Python 3.11+), for 3.10 too."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc), so that the next method's RSS starts from what
    the process still holds rather than from what an earlier method left in the allocator."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: the lifetime peak
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require(method: str, error: ImportError):
    package = PACKAGES[method]
    raise PeerUnavailable(f"{package} is not installed ({error}); pip install {package} in the peers' environment "
                          "(see this script's docstring)") from error


# ------------------------------------------------------------------------------------------------- methods

def quantize_hqq(args, calibration, tokenizer) -> Quantized:
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    except ImportError as e:
        _require("hqq", e)
    model = fresh_model("float32")
    quant_config = BaseQuantizeConfig(nbits=args.bits, group_size=GROUP_SIZE)  # axis=1: groups along the input
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    layers = block_linears(model)
    started = time.perf_counter()
    for name, linear in layers:
        # float16: HQQ's default compute dtype, the dtype its scale and zero point are stored in
        set_module(model, name, HQQLinear(linear, quant_config, compute_dtype=torch.float16, device="cpu"))
    seconds = time.perf_counter() - started
    peak = peak_rss_mib()
    storage = Storage()
    dtype = getattr(torch, args.dtype)
    for name, _ in layers:
        layer = model.get_submodule(name)
        meta = layer.meta
        storage.add("codes", layer.W_q, "W_q")
        storage.add("scales", meta["scale"], "scale")
        storage.add("zeros", meta["zero"], "zero")
        if layer.bias is not None:
            storage.add("other", layer.bias, "bias")
        storage.weights += layer.in_features * layer.out_features
        storage.layers += 1
        # run in the scoring dtype: float16 -> float32 is exact
        layer.compute_dtype = dtype
        meta["compute_dtype"] = dtype
        meta["scale"], meta["zero"] = meta["scale"].to(dtype), meta["zero"].to(dtype)
        if layer.bias is not None:
            layer.bias = layer.bias.to(dtype)
    if dtype != torch.float32:
        for name, module in model.named_modules():
            if not isinstance(module, HQQLinear):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(dtype)
    return Quantized(model, storage, seconds, {"config": {"nbits": args.bits, "group_size": GROUP_SIZE, "axis": 1,
                                                          "optimize": True, "meta_dtype": "float16"},
                                               "calibration": "none (HQQ is calibration-free)"}, peak)


def _unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ-style packing: ``32 // bits`` values per int32 along ``dim``, the first in the lowest bits."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:  # (R, C) -> (R * per, C)
        values = (packed.unsqueeze(1) >> shifts[None, :, None]) & mask
        return values.reshape(-1, packed.shape[1])
    values = (packed.unsqueeze(2) >> shifts[None, None, :]) & mask  # (R, C) -> (R, C * per)
    return values.reshape(packed.shape[0], -1)


def _dequantize_gptq_packed(tensors: dict, bits: int, group_size: int, zero_offset: int) -> torch.Tensor:
    """The float32 ``(out, in)`` weight of a GPTQ-packed layer: ``scale * (q - (z + zero_offset))``."""
    q = _unpack_int32(tensors["qweight"], bits, 0)  # (in, out)
    scales = tensors["scales"].float()  # (groups, out)
    zeros = _unpack_int32(tensors["qzeros"], bits, 1)[:, :scales.shape[1]]  # (groups, out)
    g_idx = tensors.get("g_idx")
    g_idx = (g_idx.long() if g_idx is not None else torch.arange(q.shape[0]) // group_size)[:q.shape[0]]
    weight = scales[g_idx] * (q.float() - (zeros[g_idx] + zero_offset).float())
    return weight.t().contiguous()


def quantize_autoround(args, calibration, tokenizer) -> Quantized:
    try:
        from auto_round import AutoRound
    except ImportError as e:
        _require("autoround", e)
    from safetensors import safe_open

    model = fresh_model("float32")
    names = [name for name, _ in block_linears(model)]
    data = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in calibration]
    nsamples, seqlen = calibration.shape
    started = time.perf_counter()
    autoround = AutoRound(model, tokenizer, bits=args.bits, group_size=GROUP_SIZE, iters=args.iters, nsamples=nsamples,
                          seqlen=seqlen, dataset=data, batch_size=min(8, nsamples), device_map="cpu")
    autoround.quantize()
    tuned = time.perf_counter()
    quantized_model = getattr(autoround, "model", None)
    quantized_model = model if quantized_model is None else quantized_model
    fake = {name: quantized_model.get_submodule(name).weight.detach().float().clone() for name in names}
    storage = Storage()
    exported: dict[str, dict[str, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="compare-peers-autoround-") as folder:
        autoround.save_quantized(folder, format="auto_round", inplace=True)
        seconds = time.perf_counter() - started
        peak = peak_rss_mib()
        with open(os.path.join(folder, "config.json")) as handle:
            qconfig = json.load(handle).get("quantization_config", {})
        for file in sorted(os.listdir(folder)):
            if not file.endswith(".safetensors"):
                continue
            with safe_open(os.path.join(folder, file), "pt") as handle:
                for key in handle.keys():
                    layer, _, leaf = key.rpartition(".")
                    if layer in names:
                        exported.setdefault(layer, {})[leaf] = handle.get_tensor(key)
    del autoround, quantized_model, model
    gc.collect()
    missing = [name for name in names if "qweight" not in exported.get(name, {})]
    if missing:
        raise RuntimeError(f"AutoRound's export holds no packed weights for {len(missing)} layers, e.g. {missing[0]}")
    kinds = {"qweight": "codes", "scales": "scales", "qzeros": "zeros"}
    scored = fresh_model(args.dtype)
    # the zero-point convention of the "auto_round:auto_gptq" packing: stored z, or z - 1 (GPTQ v1)? The one that
    # reproduces AutoRound's own fake-quantized weights (they are rounded to the model's bf16/fp32 while tuning).
    offsets = {}
    for offset in (0, 1):
        probe = names[0]
        weight = _dequantize_gptq_packed(exported[probe], args.bits, GROUP_SIZE, offset)
        offsets[offset] = float((weight - fake[probe]).abs().max() / fake[probe].abs().max())
    zero_offset = min(offsets, key=offsets.get)
    worst = 0.0
    for name in names:
        tensors = exported[name]
        for leaf, tensor in tensors.items():
            storage.add(kinds.get(leaf, "other"), tensor, leaf)
        weight = _dequantize_gptq_packed(tensors, args.bits, GROUP_SIZE, zero_offset)
        worst = max(worst, float((weight - fake[name]).abs().max() / fake[name].abs().max()))
        layer = scored.get_submodule(name)
        if weight.shape != layer.weight.shape:
            raise RuntimeError(f"{name}: AutoRound's export dequantizes to {tuple(weight.shape)}, "
                               f"the layer is {tuple(layer.weight.shape)}")
        layer.weight.data = weight.to(layer.weight.dtype)
        storage.weights += weight.numel()
        storage.layers += 1
    if worst > 1e-2:
        raise RuntimeError(f"AutoRound's packed export does not reproduce its fake-quantized weights (largest "
                           f"difference {worst:.3g} of a layer's largest weight): unknown packing {qconfig}")
    return Quantized(scored, storage, seconds, {
        "config": {k: qconfig.get(k) for k in ("bits", "group_size", "sym", "iters", "packing_format",
                                                "data_type", "autoround_version")},
        "tune_seconds": tuned - started, "export_seconds": seconds - (tuned - started),
        "zero_offset": zero_offset, "export_vs_fake_max_rel_diff": worst,
        "calibration": f"upq_hf 'self' {nsamples}x{seqlen} tokens (all-ones attention mask)"}, peak)


def quantize_gptq(args, calibration, tokenizer) -> Quantized:
    # GPTQModel 7.7 builds a 2-worker model-loader pool on a parent CPU pool of (cores + 1) // 2 workers and
    # refuses to start where that is 1 (a 2-core machine): ask for 2 CPU workers there
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and ((os.cpu_count() or 1) + 1) // 2 < 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
    try:
        from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    except ImportError as e:
        _require("gptq", e)
    except Exception as e:  # noqa: BLE001 - a broken install: say so on one line
        raise PeerUnavailable(f"gptqmodel does not import here: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    from safetensors import safe_open

    config = QuantizeConfig(bits=args.bits, group_size=GROUP_SIZE, offload_to_disk=False)
    loading = time.perf_counter()
    wrapper = GPTQModel.load(bundled_model_dir(), config, device="cpu")
    load_seconds = time.perf_counter() - loading
    names = [name for name, _ in block_linears(wrapper.model)]
    model_dtype = str(wrapper.model.dtype).replace("torch.", "")
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calibration]
    started = time.perf_counter()
    wrapper.quantize(data, batch_size=1)
    seconds = time.perf_counter() - started
    peak = peak_rss_mib()
    qcfg = wrapper.quantize_config
    config_used = {k: str(getattr(qcfg, k, None)) for k in ("bits", "group_size", "sym", "desc_act",
                                                             "act_group_aware", "damp_percent", "format")}
    scored = fresh_model(args.dtype)
    storage = Storage()
    kinds = {"qweight": "codes", "scales": "scales", "qzeros": "zeros"}
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="compare-peers-gptq-") as folder:
        # the layers as quantize() leaves them hold the zero points in GPTQ's v1 storage convention, which the
        # Torch kernel does not read: save, and load back through GPTQModel's CPU inference path
        saving = time.perf_counter()
        wrapper.save(folder)
        save_seconds = time.perf_counter() - saving
        del wrapper
        gc.collect()
        # float16: the dtype the scales are stored in (GPTQModel's "auto" is bfloat16 on this kind of CPU, which
        # would round them); the scored model runs in --dtype all the same
        loaded = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        stored: dict[str, dict[str, torch.Tensor]] = {}
        for file in sorted(os.listdir(folder)):
            if file.endswith(".safetensors"):
                with safe_open(os.path.join(folder, file), "pt") as handle:
                    for key in handle.keys():
                        layer, _, leaf = key.rpartition(".")
                        if layer in names:
                            stored.setdefault(layer, {})[leaf] = handle.get_tensor(key)
    for name in names:
        layer = loaded.model.get_submodule(name)
        if isinstance(layer, nn.Linear) or name not in stored:
            raise RuntimeError(f"GPTQModel left {name} unquantized ({type(layer).__name__})")
        if "dequantize_weight" in vars(layer):  # TorchLinear wraps it in torch.compile: the plain method instead
            del layer.dequantize_weight
        for leaf, tensor in stored[name].items():
            storage.add(kinds.get(leaf, "other"), tensor, leaf)
        storage.weights += layer.in_features * layer.out_features
        storage.layers += 1
        # the kernel's weight against the stored tensors read as GPTQ v1 (zero point stored minus one)
        with torch.no_grad():
            kernel = layer.dequantize_weight().float().t()  # the kernel's (in, out) weight
        weight = _dequantize_gptq_packed(stored[name], args.bits, GROUP_SIZE, 1)
        worst = max(worst, float((kernel - weight).abs().max() / weight.abs().max()))
        set_module(scored, name, layer.to("cpu"))
    details = {"config": config_used, "module": type(loaded.model.get_submodule(names[0])).__name__,
               "load_seconds": load_seconds, "save_seconds": save_seconds, "model_dtype_while_quantizing": model_dtype,
               "kernel_vs_stored_max_rel_diff": worst,
               "kernel_scales_dtype": str(loaded.model.get_submodule(names[0]).scales.dtype).replace("torch.", ""),
               "calibration": f"upq_hf 'self' {calibration.shape[0]}x{calibration.shape[1]} tokens "
                              "(all-ones attention mask)"}
    del loaded
    gc.collect()
    if worst > 1e-2:
        raise RuntimeError(f"GPTQModel's Torch kernel does not compute the stored weights (largest difference "
                           f"{worst:.3g} of a layer's largest weight)")
    return Quantized(scored, storage, seconds, details, peak)


def dense(args, calibration, tokenizer) -> Quantized:
    return Quantized(fresh_model(args.dtype), None, None, {"note": "the unquantized model: a control"})


QUANTIZERS = {"hqq": quantize_hqq, "autoround": quantize_autoround, "gptq": quantize_gptq, "dense": dense}


# ------------------------------------------------------------------------------------------------- scoring

def score(model, teacher, tokenizer, reference, prompts) -> dict:
    """bench_backends.py's scores: teacher-forced one prompt a call, then the model's own greedy answers."""
    started = time.perf_counter()
    with torch.no_grad():
        scores = fidelity(model, teacher, reference, batch_size=1)
        texts = answer_texts(model, tokenizer, prompts)
    on_topic = topicality(teacher, tokenizer, prompts, texts)["on_topic"]
    return dict(top1=scores["top1"], kl=scores["kl"], jsd=scores["jsd"], tokens=scores["tokens"],
                non_empty=sum(bool(t) for t in texts), on_topic=on_topic, answers=dict(zip(prompts, texts)),
                score_seconds=time.perf_counter() - started)


def upq_row(path: str, args, teacher, tokenizer, reference, prompts) -> dict:
    from upq_hf.checkpoint import checkpoint_info

    info = checkpoint_info(path)
    model = load_model(path, dtype=args.dtype).eval()
    row = dict(method=f"upq_hf: {path}", bpw=info["bits_per_weight"], seconds=None, peak_rss_mib=None,
               details={"quantization_config": info["quantization_config"]})
    row.update(score(model, teacher, tokenizer, reference, prompts))
    return row


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _rss(row: dict) -> str:
    if row.get("peak_rss_mib") is None:
        return "-"
    before = row.get("rss_before_mib")
    return f"{row['peak_rss_mib']:.0f}" + (f" ({before:.0f})" if before is not None else "")


def table(rows: list[dict], n_prompts: int) -> list[str]:
    lines = ["| method | bits/weight | time s | peak RSS MiB (held before) | top-1 | KL(T‖S) | on topic |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | - | - | - | - | - | - (failed, see below) |")
            continue
        lines.append(f"| {r['method']} | {_fmt(r.get('bpw'), '.3f')} | {_fmt(r.get('seconds'), '.1f')} | "
                     f"{_rss(r)} | "
                     f"{r['top1']:.4f} | {r['kl']:.4f} | "
                     f"{r['on_topic']}/{n_prompts} |")
    return lines


def main(argv=None) -> int:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="hqq,autoround,gptq",
                        help=f"comma-separated, of {', '.join(METHODS)} (dense: the unquantized control)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--limit", type=int, default=None,
                        help="score on the split's first N prompts only (a smoke test: topicality ranks each answer "
                             "among N prompts, so few prompts make it easy)")
    parser.add_argument("--nsamples", type=int, default=defaults.calibration_samples,
                        help="calibration sequences (upq_hf's default)")
    parser.add_argument("--seqlen", type=int, default=defaults.calibration_seqlen,
                        help="tokens per calibration sequence (upq_hf's default)")
    parser.add_argument("--prompts", type=int, default=defaults.prompts,
                        help="built-in prompts the 'self' calibration data answers (default: upq_hf's, 128)")
    parser.add_argument("--bits", type=int, default=2, choices=[2, 4],
                        help="2 (the comparison); 4: a check of the pipeline (every method should come close to dense)")
    parser.add_argument("--iters", type=int, default=200, help="AutoRound's tuning steps per block (its default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the scored models run in (the teacher is float32)")
    parser.add_argument("--upq", action="append", default=[], metavar="CHECKPOINT",
                        help="also score a saved upq_hf checkpoint (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = list(SPLITS[args.split])[:args.limit]
    tokenizer = load_tokenizer(bundled_model_dir())
    teacher = load_model(bundled_model_dir(), dtype="float32").eval()
    print(f"teacher answers: {len(prompts)} prompts of the {args.split} split", file=sys.stderr, flush=True)
    reference = FidelityReference.build(teacher, tokenizer, prompts)
    teacher_on_topic = topicality(teacher, tokenizer, prompts, decode_answers(tokenizer, reference.answer_ids))
    from upq_hf.data import calibration_data

    self_kwargs = {"n_prompts": args.prompts} if args.prompts else {}
    calibration = calibration_data("self", tokenizer, model=teacher, nsamples=args.nsamples, seqlen=args.seqlen,
                                   seed=0, **self_kwargs)
    print(f"calibration: {tuple(calibration.shape)} tokens", file=sys.stderr, flush=True)

    rows = []
    for method in methods:
        release_memory()
        before = (_status_kib("VmRSS") or 0) / 1024
        can_reset = reset_peak_rss()
        row = dict(method=method, package=PACKAGES.get(method),
                   version=version_of(PACKAGES[method]) if method in PACKAGES else None)
        print(f"{method}: quantizing", file=sys.stderr, flush=True)
        result = None
        try:
            # in a scratch working directory: GPTQModel writes its per-layer logs to ./logs
            with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="compare-peers-") as scratch, \
                    working_directory(scratch):
                result = QUANTIZERS[method](args, calibration, tokenizer)
            row.update(seconds=result.seconds, rss_before_mib=round(before, 1), peak_rss_mib=result.peak_rss_mib,
                       peak_rss_reset=can_reset, details=result.details)
            if result.storage is not None:
                row.update(result.storage.summary())
            else:
                row["bpw"] = float(torch.finfo(getattr(torch, args.dtype)).bits)
            print(f"{method}: quantized in {_fmt(result.seconds, '.1f')} s; scoring", file=sys.stderr, flush=True)
            with stdout_to_stderr():
                row.update(score(result.model, teacher, tokenizer, reference, prompts))
        except Exception as e:  # noqa: BLE001 - one peer's failure must not stop the others
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, PeerUnavailable):
                reason = f"{type(e).__name__}: {reason}"
            row["error"] = reason
            rows.append(row)
            print(f"{method}: skipped: {reason}", file=sys.stderr, flush=True)
            continue
        del result
        rows.append(row)
        print(f"  {method}: {row.get('bpw', 0):.3f} bits/weight, top-1 {row['top1']:.4f}, KL {row['kl']:.4f}, "
              f"JSD {row['jsd']:.4f}, {row['non_empty']}/{len(prompts)} not empty, "
              f"{row['on_topic']}/{len(prompts)} on topic", file=sys.stderr, flush=True)
    for path in args.upq:
        try:
            rows.append(upq_row(path, args, teacher, tokenizer, reference, prompts))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(method=f"upq_hf: {path}", error=f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            print(f"upq_hf {path}: skipped: {rows[-1]['error']}", file=sys.stderr, flush=True)

    versions = {"upq_hf": upq_hf.__version__, "torch": torch.__version__, "transformers": version_of("transformers"),
                **{PACKAGES[m]: version_of(PACKAGES[m]) for m in ("hqq", "autoround", "gptq")}}
    tokens = sum(len(a) for a in reference.answer_ids)
    lines = [f"bundled SmolLM2-135M-Instruct, {args.split} split ({len(prompts)} prompts, {tokens} teacher answer "
             f"tokens; the teacher's own answers: {teacher_on_topic['on_topic']}/{len(prompts)} on topic), scored in "
             f"{args.dtype}; INT{args.bits} g{GROUP_SIZE}; calibration: upq_hf 'self' {args.nsamples}x{args.seqlen}"
             f"{f', AutoRound {args.iters} iters' if 'autoround' in methods else ''}; "
             f"torch threads {torch.get_num_threads()}; "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
    lines += table(rows, len(prompts))
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines.append("")
        lines += [f"- {r['method']}: not measured: {r['error']}" for r in failed]
    print("\n".join(lines))
    if args.json:
        write_text(args.json, json.dumps({
            "model": "bundled SmolLM2-135M-Instruct", "split": args.split, "prompts": prompts, "dtype": args.dtype,
            "bits": args.bits, "group_size": GROUP_SIZE,
            "calibration": {"dataset": "self", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0,
                            "n_prompts": args.prompts or 128},
            "autoround_iters": args.iters, "threads": torch.get_num_threads(), "versions": versions,
            "teacher": {"answer_tokens": tokens, "on_topic": teacher_on_topic["on_topic"]},
            "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
