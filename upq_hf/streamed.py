"""The ``upq`` recipe for a model larger than memory: its dense weights stay on disk, one block at a time in memory.

The same stages as :func:`upq_hf.recipes.upq`, in an order that never needs the dense model whole:

1. The teacher is a :func:`upq_hf.offload.skeleton` (embeddings, final norm and head in memory; every decoder
   block read from the checkpoint's safetensors files around its forward, :meth:`BlockStore.streaming`). It
   answers the ``"self"`` prompts and gives the calibration text as the dense model would.
2. The student is a second skeleton sharing the teacher's embeddings and head. Its blocks are quantized in
   order, each read from disk once: block-wise PTQ to INT4 (``ptq.int4_epochs`` > 0), then the INT2
   reconstruction (from the INT4 latents, or by default from the unquantized weights),
   each against its own activation stream (:class:`upq_hf.ptq.BlockwisePTQ`, two passes interleaved block by
   block: the same arithmetic as the in-memory recipe's two passes one after the other). The INT2 codes are
   then fixed, kept packed and the latent weights dropped (:meth:`upq_hf.qat.QATLinear.drop_latent`), so the
   student is its packed size plus its scales.
3. Distill-QAT trains the scales and norms against the teacher's top-k distributions, cached with the
   streamed teacher before training; the student recomputes each block's activations in the backward pass
   (activation checkpointing), so training holds one block's activations.

After every block the finished blocks and the activation streams are written to ``work_dir`` (atomically), so
a killed run resumes at the next block. Where the checkpoint's dtype is float32 (the bundled model) this path
computes what the in-memory recipe computes, bit for bit; a bf16 checkpoint keeps the teacher, the activations
and the embeddings in bf16 (the in-memory command line loads float32), see docs/quantize.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import torch
from torch import nn

from . import convert, offload
from .recipes import Run, _calibration, _e2e_qp, _log, _train, ptq_options

#: the in-memory ``upq`` recipe's peak memory, in multiples of the model's bf16 size (a 1B-shaped model measured
#: 20.9 GiB against its 2.05 GiB of bf16 weights, docs/BENCHMARKS.md)
IN_MEMORY_FACTOR = 10.0
STATE = "stream-state.safetensors"


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


def choose(source: str, config, device, stream: str = "auto") -> tuple[bool, str]:
    """Whether ``upq quantize`` streams the model (``stream``: ``"auto"``, ``"on"`` or ``"off"``) and why, in
    one line for the log."""
    if stream == "off":
        return False, "in-memory path (--stream off)"
    if config.recipe != "upq":
        if stream == "on":
            raise ValueError(f"--stream on: only recipe 'upq' streams a model from disk, not {config.recipe!r}")
        return False, f"in-memory path (recipe {config.recipe!r})"
    problem = offload.stream_problem(source, config)
    if problem:
        return False, f"in-memory path: the model cannot be streamed from disk ({problem})"
    unrotated = "; unrotated (rotation auto: a rotation needs the whole model in memory)" \
        if config.rotation == "auto" else ""
    if stream == "on":
        return True, f"streaming the model block by block from disk (--stream on){unrotated}"
    index = offload.SafetensorsIndex.of_folder(offload._local_folder(source))
    need = IN_MEMORY_FACTOR * index.nbytes * 2 / index.dtype().itemsize
    have = _available_bytes(torch.device(device or "cpu"))
    if need > 0.8 * have:
        return True, (f"streaming the model block by block from disk: the in-memory path needs about "
                      f"{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB is available{unrotated}")
    return False, (f"in-memory path (about {need / 2**30:.1f} GiB of the {have / 2**30:.1f} GiB available; "
                   f"faster; --stream on streams anyway)")


def quantize_streamed(source: str, config, run: Run | None = None) -> tuple[nn.Module, nn.Module]:
    """Quantize the checkpoint at ``source`` with recipe ``upq`` (``config``, a ``UPQConfig``) never holding its
    dense weights (see the module doc). Returns ``(student, teacher)``: the quantized model (call
    :func:`upq_hf.quantizer.attach` before saving it) and the streamed teacher (run it inside
    ``teacher._upq_block_store.streaming()``)."""
    from .models import load_tokenizer
    from .qat import freeze_model

    run = run or Run()
    _return_freed_memory()  # before the teacher's first block is read: every block comes and goes
    if config.recipe != "upq" or config.bits != 2:
        raise ValueError("quantize_streamed runs recipe 'upq' at bits=2")
    problem = offload.stream_problem(source, config)
    if problem:
        raise ValueError(f"{source} cannot be streamed: {problem}")
    if config.rotation == "auto":  # a rotation turns the whole model at once: a streamed one stays unrotated
        config.rotation = None
    # the teacher computes where the work runs, a block at a time; the student's blocks wait on the CPU (block-wise
    # PTQ moves each to the device in turn, the trainer the packed model)
    device = torch.device(run.device or "cpu")
    teacher = offload.skeleton(source, device=device)
    store = offload.BlockStore(source, teacher, device=device)
    student = offload.skeleton(source, shared=teacher if device.type == "cpu" else None)
    student_store = offload.BlockStore(source, student)
    tokenizer = run.tokenizer or load_tokenizer(source)
    convert.prepare(student, config)
    _log(f"streaming {source}: {len(store.layers)} blocks of up to {store.block_bytes / 2**20:.0f} MiB read from "
         f"disk as needed ({store.dtype})")
    with store.streaming():
        calibration = _calibration(teacher, tokenizer, config)
    _trim()
    _quantize_blocks(student, student_store, calibration, config, run, park=[teacher, student],
                     reference=store if config.ptq.int2_target == "dense" else None)
    _cast_norms(student, torch.float32)  # the norms train in float32, as in a float32 model
    # so the final norm hands the head float32 rows; under bf16 autocast F.linear casts them, without it (a CPU
    # without native bf16, a GPU run in fp32) a bf16 head needs them in its own dtype: the same cast autocast makes
    head = student.get_output_embeddings()
    head_hook = head.register_forward_pre_hook(_input_in_weight_dtype) if head is not None else None
    # the student recomputes each block's activations in the backward pass: training holds one block's
    student.config.use_cache = False
    _checkpointing(student, True)
    run = dataclasses.replace(run, tokenizer=tokenizer)
    with store.streaming():
        trainer = _train(student, teacher, tokenizer, config, run, "jsd")
        if config.e2e_qp.steps:  # E2E-QP on the same data: the teacher's cached top-k, no teacher pass
            _e2e_qp(student, teacher, tokenizer, config, run, dataset=trainer.train_dataset, pack=False)
        _checkpointing(student, False)
    if head_hook is not None:
        head_hook.remove()
    freeze_model(student, config.torch_scale_dtype, backend=config.backend)
    _cast_norms(student, store.dtype)  # trained, the norms take the model's dtype again (the rest never left it)
    convert.check_quantized(student, config)
    return student.eval(), teacher


def _input_in_weight_dtype(module: nn.Module, args: tuple):
    """Forward pre-hook: the layer's input in its weight's dtype."""
    x, *rest = args
    if torch.is_tensor(x) and x.is_floating_point() and x.dtype != module.weight.dtype:
        return (x.to(module.weight.dtype), *rest)
    return None


def _cast_norms(model: nn.Module, dtype: torch.dtype) -> None:
    """The normalisation layers' parameters of ``model`` in ``dtype``."""
    for module in model.modules():
        if offload._is_norm(module):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing of the decoder blocks on or off (transformers renamed the method in 5.2x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
    if not on and (getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook")):
        model.disable_input_require_grads()  # enabling added it: the embeddings' output would require grad


def _quantize_blocks(student: nn.Module, store: offload.BlockStore, calibration: torch.Tensor, config,
                     run: Run, park: list[nn.Module] = (), reference: offload.BlockStore | None = None) -> None:
    """Each block read once: INT4 block-wise PTQ, the INT2 reconstruction from its latents, the codes fixed and
    packed; the state written after each block for a restart. The embeddings and head of the models in ``park``
    go back to disk while the blocks are quantized (they are read again after). ``reference``: the teacher's
    store, whose blocks give the INT2 reconstruction's targets (``int2_target="dense"``)."""
    from .ptq import BlockwisePTQ
    from .qat import qat_layers, release_latents, snap

    import tempfile

    folder = os.path.join(run.work_dir, "stream") if run.work_dir else None
    if run.work_dir:
        os.makedirs(run.work_dir, exist_ok=True)
    spill = tempfile.mkdtemp(prefix="upq-spill-", dir=run.work_dir)  # each block's start and best states
    # the activation streams of both passes live in files beside those states, a step's rows read at a time
    int4 = BlockwisePTQ(student, calibration, 4, config.int4_group_size,
                        dataclasses.replace(config.ptq, epochs=config.ptq.int4_epochs), keep_qat=True, spill=spill,
                        activations=os.path.join(spill, "int4"), **ptq_options(student, config, run, 4)) \
        if config.ptq.int4_epochs else None
    int2 = BlockwisePTQ(student, calibration, 2, config.group_size, config.ptq, keep_qat=True, spill=spill,
                        activations=os.path.join(spill, "int2"),
                        layer_formats=convert.model_layer_formats(student, config),
                        **ptq_options(student, config, run, 2))
    fingerprint = json.dumps({"source": os.path.abspath(store.index.entries[next(iter(store.index.entries))].path),
                              "config": config.to_dict(), "blocks": len(store.layers)}, sort_keys=True, default=str)
    first = _restore(folder, fingerprint, student, store, int4, int2) if run.resume and folder else 0
    parked = offload.park(park, store.index)  # the calibration is captured: no embedding is needed until training
    started = time.perf_counter()
    if first:
        _log(f"resuming at block {first + 1} of {len(store.layers)}: blocks 1-{first} read back from {folder}")
    for index in range(first, len(store.layers)):
        block = store.load(index)
        store.forget(index)  # the block's dense layers go as soon as their QAT layers replace them
        if int4 is not None:
            int4.quantize_block(index)
            release_latents(block)
        if reference is not None:
            int2.quantize_block(index, reference.load(index))
            reference.release(index)
        else:
            int2.quantize_block(index)
        snap(block)
        for layer in qat_layers(block).values():
            layer.drop_latent()
        _trim()
        if folder:
            _save(folder, fingerprint, index, block, int4, int2)
    offload.unpark(parked, store.index)
    for _, ptq in _named(int4, int2):
        for key in _STREAMS + ("next_inputs",):
            getattr(ptq.run, key).close()
    shutil.rmtree(spill, ignore_errors=True)
    if int4 is not None:
        int4.finish()
    report = int2.finish()
    _log(f"streamed PTQ: {'INT4 then ' if int4 else ''}INT2, {len(store.layers)} blocks, "
         f"{report.nsamples}x{report.seqlen} tokens, {f'{int4.report.steps_per_block} + ' if int4 else ''}"
         f"{report.steps_per_block} steps/block, {time.perf_counter() - started:.0f} s")



def _libc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory() -> None:
    """Make glibc give freed memory back to the system as it goes: tensors of 1 MiB and more get their own mapping
    (``mallopt(M_MMAP_THRESHOLD)``; by default the threshold rises to 32 MiB as large blocks are freed, and a
    block's temporaries below it would stay resident, reused or not), and what the heap holds free now is trimmed.
    Costs a page fault per page of each new large tensor; the streaming path trades that for its peak."""
    libc = _libc()
    if libc is not None:
        try:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
            libc.malloc_trim(0)
        except AttributeError:
            pass


def _trim() -> None:
    """Hand the C heap's free memory back to the system (glibc)."""
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:
            pass


_STREAMS = ("quant_inputs", "fp_inputs")


def _save(folder: str, fingerprint: str, index: int, block: nn.Module, int4, int2) -> None:
    """Block ``index``'s state and, for a restart, both passes' activations and generators, atomically: the block's
    file, then the activations after it (a folder named by the number of blocks done, copied file to file by the
    kernel), then the state naming both; older activations go after."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, f"block-{index:05d}.safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(tmp))
    done = _activations(folder, index + 1)
    with atomic_path(done, folder=True) as tmp:
        for name, ptq in _named(int4, int2):
            for key in _STREAMS:
                shutil.copyfile(getattr(ptq.run, key).path, os.path.join(tmp, f"{name}.{key}.bin"))
    tensors = {f"{name}.generator": ptq.run.generator.get_state() for name, ptq in _named(int4, int2)}
    stats = {name: [dataclasses.asdict(b) for b in ptq.report.blocks] for name, ptq in _named(int4, int2)}
    with atomic_path(os.path.join(folder, STATE)) as tmp:
        save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, "done": str(index + 1),
                                               "stats": json.dumps(stats)})
    for entry in os.listdir(folder):
        if entry.startswith("activations-") and os.path.join(folder, entry) != done:
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _named(int4, int2) -> list:
    """The block-wise PTQ passes that run, by name (no INT4 pass with ``int4_epochs=0``)."""
    return [(name, ptq) for name, ptq in (("int4", int4), ("int2", int2)) if ptq is not None]


def _activations(folder: str, done: int) -> str:
    return os.path.join(folder, f"activations-{done:05d}")


def _restore(folder: str, fingerprint: str, student: nn.Module, store: offload.BlockStore, int4, int2) -> int:
    """Put the finished blocks kept in ``folder`` back; returns how many (0: none kept, or kept with other
    settings)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .ptq import BlockStats

    path = os.path.join(folder, STATE)
    if not os.path.isfile(path):
        _log(f"nothing to resume in {folder}: quantizing from the first block")
        return 0
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            _log(f"{folder} holds blocks made with other settings: quantizing from the first block")
            return 0
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    done = int(meta["done"])
    for name, ptq in _named(int4, int2):
        for key in _STREAMS:
            shutil.copyfile(os.path.join(_activations(folder, done), f"{name}.{key}.bin"), getattr(ptq.run, key).path)
        ptq.run.generator.set_state(tensors[f"{name}.generator"])
        ptq.report.blocks = [BlockStats(**b) for b in json.loads(meta["stats"])[name]]
    for index in range(done):
        block = store.load(index)
        prefix = int2.prefix(index)
        for name in (n for n in int2.run.selected if n.startswith(prefix)):
            local = name[len(prefix):]
            convert.replace_module(block, local, _shell(block.get_submodule(local), *int2.run.format_of(name),
                                                        int2.run.scale_dtype, int2.run.scale_grid))
        block.load_state_dict(load_file(os.path.join(folder, f"block-{index:05d}.safetensors")))
        store.forget(index)
    return done


def _shell(linear: nn.Linear, bits: int, group_size, scale_dtype, scale_grid):
    """An INT2 QAT layer of ``linear``'s shape with packed codes and no latent weight, to load a state into."""
    from . import formats, packing
    from .qat import QATLinear

    out_features, in_features = linear.weight.shape
    groups = formats.num_groups(in_features, formats.effective_group_size(in_features, group_size))
    zero = torch.zeros(out_features, groups) if bits == 4 else None
    layer = QATLinear(torch.zeros(1, in_features).expand(out_features, in_features), torch.ones(out_features, groups),
                      zero, linear.bias, bits, group_size, scale_dtype, scale_grid)
    layer.codes = torch.zeros(packing.packed_shape(out_features, in_features, bits), dtype=torch.int32)
    layer.codes_packed = True
    layer.register_parameter("weight", None)
    return layer.requires_grad_(False)
