"""The ``"avx2"`` backend: upq_hf's own CPU kernel (``upq_hf/csrc/upq_cpu.c``) under a ``UPQLinear``.

It reads the stored buffers as they are (``weight`` codes packed along K, ``weight_scale``, ``weight_zero``;
see :mod:`upq_hf.packing`): nothing is repacked and nothing is kept beside the layer, so the resident memory
of a UPQ model is its stored size. Per group of input columns it sums code x activation in fp32 and applies
the scale once (``s * (sum c x - z * sum x)``, ``z = 1.5`` for SEQ INT2), eight outputs per AVX2 vector, the
output rows split over ``torch.get_num_threads()`` OpenMP threads (the OpenMP runtime torch has loaded).

On CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later), calls of several rows with bf16 activations take
a second kernel in the same file: each chunk of codes becomes bf16 integers once (exact), and VDPBF16PS
multiplies them with the activations (exact in bf16) and sums in fp32, twice the products per instruction of
fp32 FMAs. It is compiled in where the compiler knows the instructions, used where the CPU has them
(:func:`bf16_wanted`; ``UPQ_CPU_BF16=0`` turns it off), and gives the same accuracy as below.

On CPUs with AVX512F/BW one-row calls (a decode step) take the same arithmetic on 16-lane vectors, a panel of up to
2,048 outputs at a time with each row of codes read as one contiguous run (the 32-output blocks of the AVX2 path
read a layer at a stride of N words, which stalls once the layer is bigger than the cache: a 1B model's layers
2.6x faster this way). Each output sees the same fp32 operations in the same order, so the results are the AVX2
kernel's bit for bit (``UPQ_CPU_AVX512=0`` turns it off).

On CPUs with AVX512-VNNI (Ice Lake, Zen 4 and later) the same file holds the ``"a8"`` backend's kernel, which is
not exact and never chosen automatically: each row's activations are quantized to int8 per weight group on the fly
(symmetric, ``q = rint(x * 127 / max|x|)``), and VPDPBUSD sums code x int8 products exactly in int32, 64 per
instruction, twice VDPBF16PS and four times fp32 FMAs; per group the result is ``s * sx * (sum c q - z * sum q)``.
Its error is the activations' int8 rounding (at most ``max|x| / 254`` per element of a group), the trade torchao's
dynamic-activation modes and llama.cpp's 8-bit activations make (``tests/test_a8.py`` derives the bound).

Accuracy (``avx2``): activations are widened to fp32 exactly and the sums run in fp32, so the result is the fp32
product with the exact dequantized weight up to fp32 summation order; a bf16 or fp16 output is rounded once.
That is closer to the exact product than the reference path, which rounds the dequantized weight to the
activation dtype first (``tests/test_avx2.py`` checks both against float64).

The C file is compiled the first time the backend is asked for, with the system's C compiler (``$CC``, else
``cc``/``gcc``/``clang``), into ``$UPQ_CACHE/kernels/`` under a name that hashes the source, the flags and the
compiler, and loaded with ``ctypes``: a fraction of a second, once per machine. Where that cannot happen (no
compiler, not x86-64, a CPU without AVX2/FMA/F16C) the backend is unavailable, :func:`unavailable_reason` says
why, and the automatic choice in :mod:`upq_hf.backends` passes it by.

A call takes the reference path instead when the kernel cannot or should not run it: more than
:data:`MAX_ROWS` rows (prefill: dequantize + one dense matmul is faster there; the int8 kernel has no such limit),
a group size that splits a 32-bit word (INT2 groups not a multiple of 16, INT4 not of 8), and calls that need a
gradient for ``x``.

The calls the kernel takes go through ``torch.ops.upq_cpu.linear`` (``upq_hf/csrc/upq_op.cpp``: the same kernel
behind torch's dispatcher, built with the system's C++ compiler against the installed torch on first use, about
15 s, cached like the kernel; ``UPQ_CPU_OP=0`` keeps it off): eager, a layer call costs a few microseconds less
than through ``ctypes``, and under ``torch.compile`` the operator is opaque to the compiler and called with no
Python in between, where the Python custom op ``upq_hf::cpu_linear`` (what runs where the operator did not build)
costs tens of microseconds a call. Either way a compiled decode step runs the kernel with no graph break, and
every path gives the same numbers bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .machine import cpu_flags

SOURCE = Path(__file__).with_name("csrc") / "upq_cpu.c"
OP_SOURCE = SOURCE.with_name("upq_op.cpp")  # the kernel as a torch operator (what the layers call)
DECODER_SOURCE = SOURCE.with_name("upq_decode.cpp")  # a whole decoder stack in C++ (upq_hf/native.py)
HEADER = SOURCE.with_name("upq_cpu.h")  # the kernel's entry points, included by all three
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared")
BF16_FLAGS = ("-DUPQ_BF16",)  # the AVX512-BF16 several-rows kernel, where the compiler knows the instructions
ABI = 5
# Rows above which a call takes the reference path: the kernel's time grows with every row, dequantize +
# matmul pays the dequantization once; on the bundled model's layers they cross at 128-256 rows
# (docs/BENCHMARKS.md, "crossover"), where torch's INT4 kernel crosses too.
MAX_ROWS = 128
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CPU_FLAGS = ("avx2", "fma", "f16c")
_BF16_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")


def _log(message: str) -> None:
    print(f"[upq] {message}", file=sys.stderr, flush=True)


def cpu_support() -> str | None:
    """Why this machine cannot run the kernel, or None when it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is x86-64 AVX2 code and this machine is {platform.machine()}"
    flags = cpu_flags()
    if flags is None:  # not Linux: torch's own dispatch level says whether AVX2 (with FMA) is there
        return None if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "this CPU has no AVX2"
    missing = [flag for flag in _CPU_FLAGS if flag not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _tool(variable: str, names: tuple[str, ...]) -> str | None:
    """The compiler ``$variable`` names, else the first of ``names`` on the PATH."""
    named = os.environ.get(variable)
    if named:
        return shutil.which(named) or named
    return next((path for name in names if (path := shutil.which(name))), None)


def _compiler() -> str | None:
    return _tool("CC", ("cc", "gcc", "clang"))


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _flags(openmp: bool, bf16: bool) -> tuple[str, ...]:
    return FLAGS + (("-fopenmp",) if openmp else ()) + (BF16_FLAGS if bf16 else ())


def _run_compiler(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        raise OSError(lines[-1] if lines else f"{command[0]} exited with {done.returncode}")


def _cached_library(name: str, key: bytes, build, what: str, per: str = "machine") -> Path:
    """``$UPQ_CACHE/kernels/{name}-{hash of key}.so``, made now by ``build(path)`` if it is not there (atomically:
    into a temporary beside it, renamed into place, so concurrent processes never load half a file)."""
    from .atomic import atomic_path
    from .machine import cache_dir

    target = cache_dir() / "kernels" / f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if not target.is_file():
        started = time.perf_counter()
        with atomic_path(target) as tmp:
            build(tmp)
        _log(f"{what} into {target} ({time.perf_counter() - started:.1f} s, once per {per})")
    return target


def _build(compiler: str, openmp: bool, bf16: bool) -> Path:
    """The compiled kernel library in the cache, compiled now if it is not there."""
    flags = _flags(openmp, bf16)
    return _cached_library("upq_cpu", SOURCE.read_bytes() + HEADER.read_bytes() + repr(flags).encode()
                           + _compiler_version(compiler).encode(),
                           lambda tmp: _run_compiler([compiler, *flags, "-o", str(tmp), str(SOURCE)]),
                           "compiled the avx2 CPU kernel")


def bf16_wanted() -> bool:
    """Whether the several-rows calls with bf16 activations take the AVX512-BF16 kernel: on CPUs that have it,
    unless ``UPQ_CPU_BF16=0`` (the fp32 FMA kernel then takes them, as on AVX2-only CPUs)."""
    flags = cpu_flags() or set()
    return os.environ.get("UPQ_CPU_BF16", "1") != "0" and all(flag in flags for flag in _BF16_CPU_FLAGS)


class _Kernel:
    def __init__(self, path: Path, compiler: str = "cc", flags: tuple[str, ...] = FLAGS):
        library = ctypes.CDLL(str(path))
        self.compiler, self.flags = compiler, flags
        if library.upq_cpu_abi() != ABI:
            raise OSError(f"{path} is not the kernel this upq_hf expects (ABI {library.upq_cpu_abi()} != {ABI})")
        self.path = path
        library.upq_cpu_set_bf16.argtypes = [ctypes.c_int]
        library.upq_cpu_set_bf16.restype = ctypes.c_int
        self.set_bf16 = library.upq_cpu_set_bf16
        #: whether several-rows bf16 calls run on AVX512-BF16 (built with it, and the CPU has it)
        self.bf16 = bool(self.set_bf16(int(bf16_wanted())))
        library.upq_cpu_set_avx512.argtypes = [ctypes.c_int]
        library.upq_cpu_set_avx512.restype = ctypes.c_int
        #: whether one-row calls run on the AVX-512 kernel (built with the AVX-512 kernels, and the CPU has
        #: AVX512F/BW; ``UPQ_CPU_AVX512=0`` turns it off): the AVX2 kernel's results bit for bit, in half the
        #: instructions
        self.set_avx512 = library.upq_cpu_set_avx512
        self.avx512 = bool(self.set_avx512(int(os.environ.get("UPQ_CPU_AVX512", "1") != "0")))
        #: whether one-row int8 calls read panels of 128 outputs with prefetch (``UPQ_CPU_A8_PANELS=0``: 32-output
        #: blocks, as before; the same results bit for bit)
        library.upq_cpu_set_a8_panels.argtypes = [ctypes.c_int]
        library.upq_cpu_set_a8_panels.restype = ctypes.c_int
        self.set_a8_panels = library.upq_cpu_set_a8_panels
        self.a8_panels = bool(self.set_a8_panels(int(os.environ.get("UPQ_CPU_A8_PANELS", "1") != "0")))
        self.linear = library.upq_linear
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self.linear.argtypes = [pointer, integer, integer, integer, pointer, integer, integer, integer, pointer,
                                pointer, integer, pointer, integer, pointer, integer, integer]
        self.linear.restype = integer
        #: whether this CPU runs the int8-activation kernel (AVX512-VNNI, and built with the AVX-512 kernels)
        self.a8 = bool(library.upq_cpu_a8_supported())
        self.linear_a8 = library.upq_linear_a8
        self.linear_a8.argtypes = self.linear.argtypes
        self.linear_a8.restype = integer


@functools.lru_cache(maxsize=None)
def _load() -> tuple[_Kernel | None, str | None]:
    reason = cpu_support()
    if reason is not None:
        return None, reason
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    errors = []
    # without OpenMP (e.g. Apple clang) the kernel runs on one thread; a compiler that does not know
    # AVX512-BF16 builds the rest
    for openmp in (True, False):
        for bf16 in (True, False):
            try:
                return _Kernel(_build(compiler, openmp, bf16), compiler, _flags(openmp, bf16)), None
            except (OSError, subprocess.SubprocessError) as error:
                errors.append(str(error))
    return None, f"{compiler} could not build {SOURCE.name}: {errors[0]}"


def kernel() -> _Kernel | None:
    """The loaded kernel, compiled on first use; None where this machine cannot have it (see
    :func:`unavailable_reason`)."""
    return _load()[0]


# The machine queries below are constants of the process: under ``torch.compile`` they are evaluated once, when
# the graph is traced (``assume_constant_result``), not traced into (they read /proc/cpuinfo and load a library).
@torch.compiler.assume_constant_result
def available() -> bool:
    return kernel() is not None


@torch.compiler.assume_constant_result
def has_a8() -> bool:
    """Whether the int8 (``"a8"``) kernel runs here (AVX512-VNNI)."""
    compiled = kernel()
    return compiled is not None and bool(compiled.a8)


@torch.compiler.assume_constant_result
def has_bf16() -> bool:
    """Whether the several-rows calls with bf16 activations take the AVX512-BF16 kernel."""
    compiled = kernel()
    return compiled is not None and bool(compiled.bf16)


def unavailable_reason() -> str | None:
    """Why the backend cannot run here (no AVX2, no compiler, a failed build), or None when it can."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def say_why_once() -> None:
    """Log, once per process, why the automatic choice passes this backend by when a compiler failed to build it
    (a CPU without AVX2 or a machine without a compiler is no news)."""
    reason = unavailable_reason()
    if reason and "could not build" in reason:
        _log(f"the avx2 CPU backend is unavailable ({reason}); UPQ layers on the CPU use another path")


def _cxx() -> str | None:
    return _tool("CXX", ("c++", "g++", "clang++"))


def _build_torch_library(compiled: _Kernel, name: str, source: Path, cxx_flags: tuple[str, ...], what: str) -> Path:
    """``source`` (C++ against torch) + its own copy of ``upq_cpu.c`` with the flags the loaded kernel was built
    with, linked against this torch, as ``{name}-*.so`` in the cache, built now if it is not there (once per machine
    and torch version)."""
    import tempfile

    from torch.utils import cpp_extension

    cxx = _cxx()
    if cxx is None:
        raise OSError("no C++ compiler found (set CXX, or install g++ or clang++)")
    torch_dir = Path(torch.__file__).parent
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    openmp = ("-fopenmp",) if "-fopenmp" in compiled.flags else ()
    cxx_flags = (*cxx_flags, "-fPIC", "-std=c++17", abi, *includes)
    link = ("-shared", *openmp, f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}")
    key = (source.read_bytes() + SOURCE.read_bytes() + HEADER.read_bytes()
           + repr((compiled.flags, cxx_flags, link)).encode() + torch.__version__.encode()
           + _compiler_version(compiled.compiler).encode() + _compiler_version(cxx).encode())
    c_flags = tuple(flag for flag in compiled.flags if flag != "-shared")

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            kernel_o, source_o = Path(work) / "upq_cpu.o", Path(work) / f"{source.stem}.o"
            _run_compiler([compiled.compiler, *c_flags, "-c", str(SOURCE), "-o", str(kernel_o)])
            _run_compiler([cxx, *cxx_flags, "-w", "-c", str(source), "-o", str(source_o)])
            _run_compiler([cxx, str(source_o), str(kernel_o), *link, "-o", str(tmp)])

    return _cached_library(name, key, build, what, "machine and torch version")


def _build_op(compiled: _Kernel) -> Path:
    """The kernel as a torch operator (``upq_op.cpp``): about 15 s to build, once per machine and torch version."""
    return _build_torch_library(compiled, "upq_op", OP_SOURCE, ("-O2",), "built the avx2 kernel's torch operator")


def _build_decoder(compiled: _Kernel) -> Path:
    """The native decoder (``upq_decode.cpp``, registered as more ``upq_cpu`` operators), built on first use of
    :mod:`upq_hf.native` only: about 25 s, once per machine and torch version."""
    openmp = ("-fopenmp",) if "-fopenmp" in compiled.flags else ()
    return _build_torch_library(compiled, "upq_decode", DECODER_SOURCE, ("-O3", "-mavx2", "-mfma", *openmp),
                                "built the native decoder")


def _same_switches(library, compiled: _Kernel) -> None:
    """Give a library's own copy of the kernel the loaded kernel's switches (bf16, AVX-512, int8 panels)."""
    library.upq_cpu_set_bf16(ctypes.c_int(int(compiled.bf16)))
    library.upq_cpu_set_avx512(ctypes.c_int(int(compiled.avx512)))
    library.upq_cpu_set_a8_panels(ctypes.c_int(int(compiled.a8_panels)))


@functools.lru_cache(maxsize=None)
def load_decoder() -> str | None:
    """Build and load the native decoder's operators (``torch.ops.upq_cpu.decoder_*``); None when they run, else
    why not. They need the kernel's own operator loaded first (their namespace)."""
    if not has_op():
        return "the CPU kernel's C++ operator did not build here"
    compiled = kernel()
    try:
        path = _build_decoder(compiled)
        torch.ops.load_library(str(path))
        library = ctypes.CDLL(str(path))  # its own copy of the kernel: the same switches
        _same_switches(library, compiled)
        _OP_LIBRARY.append(library)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"the native decoder did not build ({error})"
    return None


@functools.lru_cache(maxsize=None)
def _load_op() -> str | None:
    """Build and load ``torch.ops.upq_cpu.linear``; None when it runs, else why not (then eager calls take the
    kernel through ``ctypes`` and compiled graphs through the Python custom op :func:`cpu_linear`: slower per call,
    the same numbers). ``UPQ_CPU_OP=0`` keeps it off."""
    compiled = kernel()
    if compiled is None:
        return unavailable_reason()
    if os.environ.get("UPQ_CPU_OP", "1") == "0":
        return "UPQ_CPU_OP=0"
    try:
        path = _build_op(compiled)
        if _OP_KERNEL:  # one operator library per process (its TORCH_LIBRARY registers the namespace)
            raise RuntimeError("the operator was loaded for another build of the kernel in this process")
        torch.ops.load_library(str(path))
        # the operator's library holds its own copy of the kernel: the same bf16 switch as the ctypes one's
        library = ctypes.CDLL(str(path))
        _same_switches(library, compiled)
        torch.library.register_fake("upq_cpu::linear")(_linear_shape)
        _OP_KERNEL.append(compiled)
        _OP_LIBRARY.append(library)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _log(f"the avx2 kernel's torch operator did not build ({error}): its layers call the kernel through ctypes "
             "(eager) or a Python custom op (compiled), slower per call, the same numbers")
        return str(error)
    return None


_OP_KERNEL: list = []  # the kernel whose build the loaded operator holds (one operator library per process)
_OP_LIBRARY: list = []  # that operator library, for its own copy of the kernel's switches


def set_a8_panels(on: bool) -> None:
    """Switch the int8 kernel's one-row panels on or off (off: its 32-output blocks, the same bits) in the ctypes
    kernel and in the operator's copy of it; for benchmarks and tests (``UPQ_CPU_A8_PANELS=0`` at start-up)."""
    compiled = kernel()
    if compiled is not None:
        compiled.a8_panels = bool(compiled.set_a8_panels(int(on)))
    for library in _OP_LIBRARY:
        library.upq_cpu_set_a8_panels(ctypes.c_int(int(on)))


@torch.compiler.assume_constant_result
def has_op() -> bool:
    """Whether ``torch.ops.upq_cpu.linear`` (the kernel as a C++ torch operator) runs the calls: loaded (built on
    first call), and built from the kernel loaded now."""
    compiled = kernel()
    return compiled is not None and _load_op() is None and _OP_KERNEL[-1].path == compiled.path


def _linear_shape(x, weight, scale, zero, bias, bits, group_size, in_features, int8_activations):
    return x.new_empty(x.shape[:-1] + (weight.shape[1],))


def supports(module) -> bool:
    """Whether the layer's format fits the kernel: groups made of whole 32-bit words, or one scale per row."""
    per_word = 32 // module.bits
    group = module.group_size or module.in_features
    return group == module.in_features or group % per_word == 0


def takes(x: torch.Tensor, module, max_rows: int | None = MAX_ROWS) -> bool:
    """Whether this call runs on the kernel (else the reference path runs). ``max_rows``: None for the int8 kernel,
    which is faster than dequantize + matmul at every row count measured (docs/BENCHMARKS.md, "The `a8` backend")."""
    if x.dtype not in _DTYPES:
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False  # the kernel has no backward: the reference path is differentiable
    return 0 < x.numel() and (max_rows is None or x.numel() <= max_rows * module.in_features) and supports(module)


def linear(x: torch.Tensor, module, int8_activations: bool = False) -> torch.Tensor | None:
    """``module(x)`` on the kernel, or None where the kernel does not take the call (the caller,
    :func:`upq_hf.backends.linear_forward`, then runs another path). Called once per layer per decoded
    token: plain dict lookups for the buffers, nothing allocated but the output. Under ``torch.compile`` the call
    is the custom op ``upq_hf::cpu_linear`` (:func:`cpu_linear`), opaque to the compiler: a compiled decode step
    keeps the kernel and has no graph break.

    ``int8_activations``: the ``"a8"`` backend's kernel (activations quantized to int8 per row and weight group,
    VPDPBUSD; not exact, see the module docstring); None where this CPU lacks AVX512-VNNI."""
    if not x.is_cpu:
        name = "a8" if int8_activations else "avx2"
        raise RuntimeError(f"UPQ backend {name!r} runs on CPU tensors, got a tensor on {x.device}; "
                           "use backend='triton' or 'torch' for it")
    if not available() or not takes(x, module, None if int8_activations else MAX_ROWS) or \
            (int8_activations and not has_a8()):
        return None
    weight, scale, zero, bias = module.weight, module.weight_scale, module.weight_zero, module.bias
    # a bias that needs a gradient is added by torch (autograd sees it); otherwise the kernel adds it
    bias_apart = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    if not (weight.is_cpu and scale.dtype in _DTYPES and (bias is None or bias.dtype in _DTYPES)):
        return None
    kernel_bias = None if bias_apart else bias
    if has_op() and not (scale.requires_grad and torch.is_grad_enabled()):
        # the C++ operator: the fewest steps between the layer and the kernel, eager or compiled
        y = torch.ops.upq_cpu.linear(x, weight, scale, zero, kernel_bias, module.bits,
                                     module.group_size or module.in_features, module.in_features, int8_activations)
    elif torch.compiler.is_compiling():  # no operator built: the Python custom op, opaque to the compiler
        y = cpu_linear(x, weight, scale, zero, kernel_bias, module.bits, module.group_size or module.in_features,
                       module.in_features, int8_activations)
    else:
        y = _run(x, weight, scale, zero, kernel_bias, module.bits, module.group_size or module.in_features,
                 module.in_features, int8_activations)
    if y is None:
        return None
    return y + bias.to(y.dtype) if bias_apart else y


def _run(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
         bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
         int8_activations: bool) -> torch.Tensor | None:
    """The kernel on stored buffers (``weight`` packed codes ``(words, N)``, ``scale``/``zero`` ``(G, N)``); None
    where it hands the call back (the int8 kernel without AVX512-VNNI, or an inf/NaN in ``x``)."""
    compiled = kernel()
    if not (weight.is_contiguous() and scale.is_contiguous() and (zero is None or zero.is_contiguous())):
        weight, scale = weight.contiguous(), scale.contiguous()
        zero = None if zero is None else zero.contiguous()
    n = weight.shape[1]
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype)
    call = compiled.linear_a8 if int8_activations else compiled.linear
    status = call(x.data_ptr(), _DTYPES[x.dtype], x.numel() // in_features, in_features, weight.data_ptr(), n, bits,
                  group_size, scale.data_ptr(), None if zero is None else zero.data_ptr(), _DTYPES[scale.dtype],
                  None if bias is None else bias.data_ptr(), 0 if bias is None else _DTYPES[bias.dtype],
                  y.data_ptr(), _DTYPES[y.dtype], torch.get_num_threads())
    if status in (3, 4):  # the int8 kernel found no AVX512-VNNI, or an inf or NaN in x: the exact kernel runs it
        return None
    if status:
        raise RuntimeError(f"the avx2 kernel failed on UPQLinear({in_features}, {n}) with status {status}"
                           + (" (out of memory)" if status == 2 else ""))
    return y


@torch.library.custom_op("upq_hf::cpu_linear", mutates_args=())
def cpu_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
               int8_activations: bool) -> torch.Tensor:
    """The CPU kernel as a custom op (what ``torch.compile`` sees of a ``UPQLinear`` on this backend): the kernel's
    result, or where it hands the call back (an inf/NaN for the int8 kernel), the exact one's, or the reference."""
    y = _run(x, weight, scale, zero, bias, bits, group_size, in_features, int8_activations)
    if y is None and int8_activations:
        y = _run(x, weight, scale, zero, bias, bits, group_size, in_features, False)
    if y is None:  # the reference: dequantize, then a dense product
        from . import formats, packing

        codes = packing.unpack_codes(weight, bits, in_features)
        qw = formats.QuantizedWeight(codes, scale.t(), None if zero is None else zero.t(), bits,
                                     None if group_size == in_features else group_size)
        y = torch.nn.functional.linear(x, formats.dequantize(qw, x.dtype), None if bias is None else bias.to(x.dtype))
    return y


cpu_linear.register_fake(_linear_shape)
