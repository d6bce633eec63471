"""Ahead-of-time compilation of every UPQ kernel variant and configuration for real NVIDIA targets,
on a machine without a GPU, and what the compiler reports for each (registers, local memory, shared
memory).

    python -m upq_kernels.aot [--arch 80 90] [--set quick|full] [--jobs N] [--markdown] [--json PATH]

Each case runs the variant's own host code (``launch``/``dequantize_transposed`` with the fitted
configuration, on CPU stand-in tensors of the real shapes) with the kernel replaced by a recorder, so
the arguments compiled are exactly those a launch would pass. The recorded arguments are specialised
as Triton's JIT specialises them (pointers and integers divisible by 16 marked so, integers equal to
1 made constants, ``None`` a constant) and compiled with
``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
options=dict(num_warps=..., num_stages=...))`` down to a cubin. Registers and local memory (spills and
stack) come from ``cuobjdump --dump-resource-usage`` on that cubin (the tool ships with Triton),
shared memory from the compiled kernel's metadata (Triton allocates it dynamically).

A case fails if it does not compile, or if it needs more shared memory than the target's largest
block allows (sm_80: 163 KiB, sm_90: 227 KiB); the default configurations, which run untuned, must
also fit the 99 KiB of sm_86/sm_89.

This must run in a process where ``TRITON_INTERPRET`` was not set when ``upq_kernels`` was imported:
under the interpreter ``@triton.jit`` gives interpreter objects, which cannot be compiled (and every
``@triton.jit`` helper a kernel calls is one too). The test (tests/test_kernels_aot.py) runs this
module in subprocesses without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from . import dequant, dot_splitk, dot_tiled, gemv_splitk
from .common import INTERPRETER, PackedWeight, compute_dtype
from upq_hf.atomic import write_text
from upq_hf.packing import packed_shape

ARCHS = (80, 90)
# Largest dynamic shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90); sm_86/sm_89 (RTX 30xx/40xx,
# L4, A10) allow 99 KiB, which the default configurations must fit as they run untuned on any GPU.
SHARED_LIMIT = {80: 166912, 90: 232448}
DEFAULT_SHARED_LIMIT = 101376
VARIANT_MODULES = {"gemv": gemv_splitk, "splitk": dot_splitk, "tiled": dot_tiled, "dequant": dequant}
KERNEL_NAMES = {"gemv": "gemv_splitk_kernel", "splitk": "dot_splitk_kernel", "tiled": "dot_tiled_kernel",
                "dequant": "dequantize_kernel"}
# The rows each variant is compiled for: the M buckets of its range that give different fitted BLOCK_M
# (gemv: BLOCK_M = the power of two covering M, at most 4; the tl.dot kernels: at least 16).
ROWS = {"gemv": (1, 2, 4), "splitk": (16, 64), "tiled": (128,), "dequant": (1,)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One compilation: a variant, its fitted configuration and the constexprs that shape the code."""

    variant: str
    config: tuple  # the fitted configuration as sorted (key, value) pairs
    bits: int
    group_size: int | None
    dtype: str
    bias: bool
    M: int
    K: int
    N: int
    is_default: bool = False

    @property
    def config_dict(self) -> dict:
        return dict(self.config)

    def label(self) -> str:
        group = "row" if self.group_size is None else f"g{self.group_size}"
        return f"{self.variant} INT{self.bits} {group} {self.dtype}{' +bias' if self.bias else ''} M={self.M} {self.config_dict}"


@dataclass
class Result:
    case: Case
    arch: int
    ok: bool
    error: str = ""
    seconds: float = 0.0
    registers: int | None = None
    local_bytes: int | None = None  # per thread: register spills and stack
    shared_bytes: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    problems: list = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["case"] = asdict(self.case) | {"config": self.case.config_dict}
        return out


# ----------------------------------------------------------------------------------------------
# Which cases
# ----------------------------------------------------------------------------------------------

def stand_in_weight(bits: int, group_size: int | None, K: int, N: int) -> PackedWeight:
    groups = 1 if group_size is None else K // group_size
    packed = torch.empty(packed_shape(N, K, bits), dtype=torch.int32)
    scale = torch.empty(groups, N, dtype=torch.float16)
    zero = torch.empty(groups, N, dtype=torch.float16) if bits == 4 else None
    return PackedWeight(packed, scale, zero, bits, group_size, K)


def fitted(variant: str, config: dict, M: int, weight: PackedWeight) -> dict | None:
    module = VARIANT_MODULES[variant]
    if variant == "dequant":
        return module.fit_config(config, weight)
    return module.fit_config(config, M, weight)


def _candidates(variant: str) -> list[tuple[dict, bool]]:
    module = VARIANT_MODULES[variant]
    seen, out = [], []
    for config, is_default in [(module.DEFAULT_CONFIG, True)] + [(c, False) for c in module.CONFIGS]:
        if config not in seen:
            seen.append(config)
            out.append((config, is_default))
    return out


# The default configuration of each variant over the constexpr branches the configuration sweep does not
# take: (bits, group_size, activation dtype, bias, K, N). INT4 (zero points), group scales, fp16 and fp32
# activations, a bias, and the bundled model's 576 x 192 layer (blocks fitted down, masked borders).
BRANCHES = [(4, 128, "bf16", False, 4096, 4096), (4, None, "fp16", True, 4096, 4096), (2, 64, "fp16", False, 4096, 4096),
            (2, 128, "fp32", True, 4096, 4096), (2, 64, "bf16", False, 576, 192)]


def cases(which: str = "quick") -> list[Case]:
    """``quick`` (what the test compiles): every configuration of every variant (``CONFIGS`` and
    ``DEFAULT_CONFIG``) in its largest fitted form, i.e. for a 4096 x 4096 INT2 per-row layer (no group
    shrinks BLOCK_K) at the largest M of the variant's range, in bf16; plus each variant's default
    configuration over :data:`BRANCHES`. ``full`` adds every M bucket of each variant's range (the fitted
    BLOCK_M changes) and the group-128 form of every configuration (BLOCK_K shrinks to the group)."""
    out: list[Case] = []

    def add(variant, config, bits, group, dtype, bias, M, K, N, is_default):
        weight = stand_in_weight(bits, group, K, N)
        fit = fitted(variant, config, M, weight)
        if fit is None:
            return
        case = Case(variant, tuple(sorted(fit.items())), bits, group, dtype, bias, M, K, N, is_default)
        if all((c.variant, c.config, c.bits, c.group_size, c.dtype, c.bias) !=
               (case.variant, case.config, case.bits, case.group_size, case.dtype, case.bias) for c in out):
            out.append(case)

    for variant in VARIANT_MODULES:
        rows = ROWS[variant] if which == "full" else ROWS[variant][-1:]
        groups = (None, 128) if which == "full" else (None,)
        for config, is_default in _candidates(variant):
            for group in groups:
                for M in rows:
                    add(variant, config, 2, group, "bf16", False, M, 4096, 4096, is_default)
        default = VARIANT_MODULES[variant].DEFAULT_CONFIG
        M = ROWS[variant][-1]
        for bits, group, dtype, bias, K, N in BRANCHES:
            add(variant, default, bits, group, dtype, bias, M, K, N, True)
    return out


# ----------------------------------------------------------------------------------------------
# Recording a launch, specialising it, compiling it
# ----------------------------------------------------------------------------------------------

class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records instead of running."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((grid, args, kwargs))

        return record


@contextlib.contextmanager
def _recording(variant: str):
    module = VARIANT_MODULES[variant]
    name = KERNEL_NAMES[variant]
    recorder = _Recorder(getattr(module, name))
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, recorder.kernel)


def record_launch(case: Case):
    """(kernel, positional args, keyword args) that the variant's host code launches for ``case``."""
    dtype = DTYPES[case.dtype]
    weight = stand_in_weight(case.bits, case.group_size, case.K, case.N)
    x = torch.empty(case.M, case.K, dtype=dtype)
    bias = torch.empty(case.N, dtype=dtype) if case.bias else None
    out = torch.empty(case.M, case.N, dtype=dtype)
    config = case.config_dict
    with _recording(case.variant) as recorder:
        if case.variant == "dequant":
            dequant.dequantize_transposed(weight, dtype, config)
        else:
            VARIANT_MODULES[case.variant].launch(x, weight, bias, out, config, compute_dtype(dtype))
    (grid, args, kwargs), = recorder.calls
    return recorder.kernel, args, kwargs


_TORCH_TO_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                         torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def specialise(kernel, args: tuple, kwargs: dict):
    """Signature, constexprs, attributes and options as Triton's JIT builds them for these arguments:
    tensors ``*dtype`` (divisible by 16 when their address is), integers ``i32``/``i64`` (divisible by 16
    when they are; equal to 1: a constant), ``None`` a constant, ``tl.constexpr`` parameters constants."""
    names = kernel.arg_names
    values = dict(zip(names, args))
    values.update({key: value for key, value in kwargs.items() if key not in _LAUNCH_OPTIONS})
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(f"launch of {kernel.__name__} misses arguments {missing}")
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for index, (name, param) in enumerate(zip(names, kernel.params)):
        value = values[name]
        if param.is_constexpr or value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON_TYPE[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = divisible
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = divisible
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot specialise argument {name}={value!r}")
    options = {key: kwargs[key] for key in _LAUNCH_OPTIONS if key in kwargs}
    return signature, constexprs, attrs, options


def jit_specialisation(kernel, args: tuple, kwargs: dict, arch: int = 90):
    """The same as :func:`specialise`, computed by Triton's own JIT binder (private API of Triton 3.9:
    ``create_function_from_signature`` and ``JITFunction._pack_args``), for cross-checking; None where this
    Triton lacks it. Constexprs and attributes keyed by argument index (empty attributes left out)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError:
        return None
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, {key[0]: value for key, value in constexprs.items()}, {k: v for k, v in attrs.items() if v}


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """REG / LOCAL / SHARED / STACK of the kernel in a cubin, from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", handle.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, value = item.partition(":")
                if value.isdigit():
                    usage[key] = int(value)
    return usage


def compile_case(case: Case, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(case, arch, ok=False)
    start = time.perf_counter()
    try:
        kernel, args, kwargs = record_launch(case)
        signature, constexprs, attrs, options = specialise(kernel, args, kwargs)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        usage = resource_usage(compiled.asm["cubin"])
        metadata = compiled.metadata
        result.registers = usage.get("REG")
        result.local_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0)
        result.shared_bytes = int(metadata.shared) + usage.get("SHARED", 0)
        result.num_warps, result.num_stages = metadata.num_warps, metadata.num_stages
        result.ok = True
    except Exception as error:  # noqa: BLE001 - reported per case
        result.error = f"{type(error).__name__}: {str(error).strip()[:2000]}"
    result.seconds = time.perf_counter() - start
    if result.ok:
        if result.shared_bytes > SHARED_LIMIT[arch]:
            result.problems.append(f"needs {result.shared_bytes} bytes of shared memory, sm_{arch} allows "
                                   f"{SHARED_LIMIT[arch]}")
        if case.is_default and result.shared_bytes > DEFAULT_SHARED_LIMIT:
            result.problems.append(f"default configuration needs {result.shared_bytes} bytes of shared memory, "
                                   f"more than the {DEFAULT_SHARED_LIMIT} of sm_86/sm_89")
        result.ok = not result.problems
    return result


# ----------------------------------------------------------------------------------------------
# Running the set (sharded across processes) and reporting
# ----------------------------------------------------------------------------------------------

def check_specialisation(case_set: str = "full") -> list[str]:
    """Cases whose :func:`specialise` differs from Triton's JIT binder (empty where it agrees everywhere);
    raises if this Triton has no binder to compare with."""
    mismatches = []
    for case in cases(case_set):
        kernel, args, kwargs = record_launch(case)
        signature, constexprs, attrs, _ = specialise(kernel, args, kwargs)
        jit = jit_specialisation(kernel, args, kwargs)
        if jit is None:
            raise RuntimeError("this Triton has no create_function_from_signature to compare with")
        if (signature, {kernel.arg_names.index(name): v for name, v in constexprs.items()}, attrs) != jit:
            mismatches.append(case.label())
    return mismatches


def run(case_set: str, archs, shard: int = 0, shards: int = 1) -> list[Result]:
    if INTERPRETER:
        raise RuntimeError("upq_kernels was imported with TRITON_INTERPRET=1: the kernels are interpreter objects "
                           "and cannot be compiled; run this in a process without it")
    work = [(case, arch) for case in cases(case_set) for arch in archs]
    return [compile_case(case, arch) for index, (case, arch) in enumerate(work) if index % shards == shard]


def run_parallel(case_set: str, archs, jobs: int) -> list[Result]:
    """Compile in ``jobs`` fresh processes (each a shard of the cases) without ``TRITON_INTERPRET``."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset; 1 is its default
    with tempfile.TemporaryDirectory() as folder:
        processes = []
        for shard in range(jobs):
            path = os.path.join(folder, f"shard{shard}.json")
            command = [sys.executable, "-m", "upq_kernels.aot", "--set", case_set, "--arch", *map(str, archs),
                       "--shard", f"{shard}/{jobs}", "--json", path, "--quiet"]
            processes.append((subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True), path))
        results = []
        for process, path in processes:
            output, _ = process.communicate()
            if not os.path.exists(path):
                raise RuntimeError(f"AOT compile shard failed (exit {process.returncode}):\n{output[-4000:]}")
            with open(path) as handle:
                results += [result_from_json(item) for item in json.load(handle)["results"]]
    return results


def result_from_json(item: dict) -> Result:
    case = dict(item.pop("case"))
    case["config"] = tuple(sorted(case["config"].items()))
    return Result(Case(**case), **item)


def markdown(results: list[Result]) -> str:
    """One row per case, one column group per target: registers per thread, local memory per thread
    (spills and stack, bytes), shared memory per block (bytes)."""
    archs = sorted({r.arch for r in results})
    by_case: dict[Case, dict[int, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.arch] = r
    head = "| variant | config (fitted) | format | act. | M | K x N | " + " | ".join(
        f"sm_{a} regs / local / shared" for a in archs) + " | ok |"
    lines = [head, "|" + "---|" * 6 + "---:|" * len(archs) + "---|"]
    order = list(VARIANT_MODULES)
    for case in sorted(by_case, key=lambda c: (order.index(c.variant), not c.is_default, c.bits, str(c.group_size),
                                                c.dtype, c.bias, c.K, c.config, c.M)):
        per_arch = by_case[case]
        config = ", ".join(f"{k}={v}" for k, v in case.config) + (" (default)" if case.is_default else "")
        group = "row" if case.group_size is None else f"g{case.group_size}"
        cells = []
        for arch in archs:
            r = per_arch.get(arch)
            cells.append("-" if r is None or r.registers is None else f"{r.registers} / {r.local_bytes} / {r.shared_bytes}")
        problems = [f"sm_{a}: " + ("; ".join(r.problems) or r.error.splitlines()[0]) for a, r in per_arch.items() if not r.ok]
        lines.append(f"| {case.variant} | {config} | INT{case.bits} {group}{' +bias' if case.bias else ''} | {case.dtype} | "
                     f"{case.M} | {case.K}x{case.N} | " + " | ".join(cells) + f" | {'; '.join(problems) or 'yes'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every UPQ Triton kernel variant and configuration for "
                                                 "NVIDIA targets without a GPU.")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--set", default="quick", choices=["quick", "full"])
    parser.add_argument("--jobs", type=int, default=0, help="processes (default: one; with --jobs N, N subprocesses)")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.jobs:
        results = run_parallel(args.set, args.arch, args.jobs)
    else:
        shard, shards = map(int, args.shard.split("/"))
        results = run(args.set, args.arch, shard, shards)
    if args.json:
        import triton

        write_text(args.json, json.dumps({"triton": triton.__version__, "seconds": time.perf_counter() - start,
                                          "results": [r.to_json() for r in results]}, indent=1))
    failed = [r for r in results if not r.ok]
    if not args.quiet:
        if args.markdown:
            print(markdown(results))
        for r in failed:
            print(f"FAILED sm_{r.arch} {r.case.label()}: {'; '.join(r.problems) or r.error}", file=sys.stderr)
        print(f"{len(results) - len(failed)} of {len(results)} compiled for sm_{'/sm_'.join(map(str, args.arch))} "
              f"in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
