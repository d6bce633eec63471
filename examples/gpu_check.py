"""One command for a machine with a CUDA GPU and no network: are the UPQ kernels right, and how fast are they?

    python examples/gpu_check.py --out out/gpu-check            # on the GPU machine, about 5-8 minutes
    python examples/gpu_check.py --dry-run --out /tmp/gpu-check  # on a CPU: the same code paths on tiny
                                                                 # shapes, kernels under Triton's interpreter

Four parts, each written to ``OUT/gpu_check.md`` (one markdown table per part) and ``OUT/gpu_check.json``:

1. **Kernel correctness without the interpreter**: every variant (gemv, splitk, tiled, dequant) with every
   configuration it may run (each ``CONFIGS`` entry and ``DEFAULT_CONFIG``, forced and fitted) on an INT2
   group-128 layer with odd N, then each variant's default configuration over the other formats (INT2
   per-row with K not a multiple of 16, INT4 with fractional zero points, the bundled model's 576 x 192
   layer), fp16 and bf16 activations, with and without a bias; every output into a NaN-poisoned strided
   view (an unwritten or out-of-bounds element shows). Reference: fp32 ``x @ W.T + b`` with ``W`` rebuilt
   by ``upq_hf.packing``/``upq_hf.formats``.
2. **Kernel benchmark grid** against ``F.linear`` on the bf16 weight (cuBLAS) in the same run: M = 1, 16,
   256, 1024 (and 4096 with ``--full``) on 4096x4096, 4096x14336 and 14336x4096 (K x N), INT2 group 128 and
   INT2 per-row (INT4 g128 too with ``--full``). Timing: CUDA-graph replays that rotate through enough
   weight copies to overrun L2, an L2 flush before each replay, median (examples/bench_kernels.py). The
   first call of each shape tunes the configuration (the choices are saved in OUT).
3. **End-to-end greedy decode** tokens/s of a random-weight Llama shaped like TinyLlama-1.1B (config built
   here, no download), bf16 against INT2 per-row and INT2 g128 (round to nearest), static KV cache and the
   forward compiled with ``torch.compile(backend="cudagraphs")`` (CUDA graphs without inductor's codegen, so
   setup stays short and both models get the same treatment; ``--decode-compile inductor`` uses
   inductor's ``reduce-overhead`` instead, ``none`` runs eager); tokens/s from two generation lengths,
   so prefill and warm-up cancel.
4. **Distill-QAT training** tokens/s of the same shape (examples/bench_train.py's ``measure``).

Targets (docs/BENCHMARKS.md): kernel speed-up over bf16 at M = 1 >= 4.5x, M = 16 >= 3x, M = 256 >= 0.8x,
M >= 1024 >= 0.95x; 1B decode >= 2x. Each part is timed; a part that would start after ``--budget-s`` is
skipped and marked so. Exit status 1 if any correctness case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/gpu-check", help="folder for gpu_check.md, gpu_check.json, tuned configs")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU, kernels under TRITON_INTERPRET=1 (exercises the code paths)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (implies --dry-run)")
    parser.add_argument("--full", action="store_true", help="also M = 4096 and INT4 g128 in the grid")
    parser.add_argument("--parts", default="correctness,grid,decode,train,distributed", help="comma-separated parts to run")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip parts that would start after this")
    parser.add_argument("--replays", type=int, default=20, help="timed graph replays per measurement (median)")
    parser.add_argument("--decode-compile", default="cudagraphs", choices=["cudagraphs", "inductor", "none"])
    parser.add_argument("--train-steps", type=int, default=5, help="Distill-QAT steps (the first is not timed)")
    parser.add_argument("--compile-workers", type=int, default=None,
                        help="processes that compile the kernels ahead of the run (default: CPU cores - 2, at most 12; "
                             "0: compile on first use)")
    parser.add_argument("--warm-shard", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        args.dry_run = True
    args.device = "cpu" if args.dry_run else (args.device or "cuda")
    if args.dry_run:
        args.replays = min(args.replays, 1)
        args.budget_s = float("inf")
        args.compile_workers = 0
    elif args.compile_workers is None:
        args.compile_workers = max(0, min(12, (os.cpu_count() or 2) - 2))
    return args


ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.dry_run:
    # The kernels run on CPU tensors only under the interpreter, and Triton reads the variable when the
    # kernels are decorated: set it before anything imports upq_kernels.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, HERE)

# ----------------------------------------------------------------------------------------------
# Sizes: the real check and the dry run
# ----------------------------------------------------------------------------------------------

REAL = dict(
    # name -> (bits, group_size, K, N)
    main_layer=("int2-g128", 2, 128, 2048, 1000),  # every configuration runs on this one (N: masked border)
    branch_layers=[("int2-row", 2, None, 1000, 768), ("int4-g128", 4, 128, 1024, 520), ("bundled-int2-g64", 2, 64, 576, 192)],
    rows={"gemv": (1, 3), "splitk": (16, 37), "tiled": (200,), "dequant": (1100,)},
    configs_per_variant=None,  # all
    branch_dtypes=[("float16", True), ("bfloat16", False)],
    shapes=[(4096, 4096), (4096, 14336), (14336, 4096)],
    grid_rows=[1, 16, 256, 1024],
    formats={"INT2 g128": (2, 128), "INT2 per-row": (2, None)},
    decode=dict(shape="1b", prompt=32, short=32, long=160, reps=3),
    train=dict(shape="1b", batch=8, seqlen=512),
)
DRY = dict(
    main_layer=("int2-g32", 2, 32, 128, 40),
    branch_layers=[("int2-row", 2, None, 90, 24), ("int4-g32", 4, 32, 96, 20)],
    rows={"gemv": (3,), "splitk": (5,), "tiled": (17,), "dequant": (3,)},
    configs_per_variant=1,
    branch_dtypes=[("float16", True)],
    shapes=[(128, 64)],
    grid_rows=[1, 16],
    formats={"INT2 g32": (2, 32)},
    decode=dict(shape="tiny", prompt=4, short=2, long=4, reps=1),
    train=dict(shape="tiny", batch=2, seqlen=16),
)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TARGETS = {1: 4.5, 16: 3.0, 256: 0.8, 1024: 0.95, 4096: 0.95}
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# 1. Correctness
# ----------------------------------------------------------------------------------------------

def make_layer(bits: int, group_size: int | None, K: int, N: int, device: str, seed: int = 0):
    """Random codes covering every value, fractional INT4 zero points; the stored tensors and the fp32 weight
    rebuilt from the packed codes (never by the kernels)."""
    from upq_hf import formats, packing

    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (N, K), generator=generator, dtype=torch.uint8)
    groups = formats.num_groups(K, group_size)
    scale = (0.5 + torch.rand(N, groups, generator=generator)).half() * 0.02
    zero = (torch.randint(0, 31, (N, groups), generator=generator) / 2).half() if bits == 4 else None
    packed = packing.pack_codes(codes, bits)
    unpacked = packing.unpack_codes(packed, bits, K)
    if bits == 2:
        weight = formats.dequantize_seq(unpacked, scale, group_size)
    else:
        weight = formats.dequantize_int4(unpacked, scale, zero, group_size)
    stored = dict(packed=packed.to(device), scale=scale.t().contiguous().to(device),
                  zero=None if zero is None else zero.t().contiguous().to(device), bits=bits, group_size=group_size,
                  in_features=K)
    return stored, weight.to(device)


def check_one(variant: str, config: dict | None, layer: dict, weight: torch.Tensor, M: int, dtype: torch.dtype,
              with_bias: bool, device: str) -> dict:
    import upq_kernels

    N = weight.shape[0]
    generator = torch.Generator().manual_seed(M * 7 + N)
    x = torch.randn(M, layer["in_features"], generator=generator).to(device=device, dtype=dtype)
    bias = torch.randn(N, generator=generator).to(device=device, dtype=dtype) if with_bias else None
    buffer = torch.full((M + 2, N + 3), float("nan"), dtype=dtype, device=device)
    out = buffer[1:M + 1, 1:N + 1]
    upq_kernels.upq_matmul(x, **layer, variant=variant, config=config, bias=bias, out=out)
    synchronize(device)
    expected = x.float() @ weight.float().t() + (0 if bias is None else bias.float())
    border = torch.cat([buffer[0], buffer[-1], buffer[:, 0], buffer[:, -1], buffer[:, -2]])
    unwritten = int(out.isnan().sum())
    scale = expected.abs().max().item() or 1.0
    error = ((out.float() - expected).abs().max().item()) / scale if not unwritten else float("nan")
    ok = unwritten == 0 and bool(border.isnan().all()) and error <= 2 * TOLERANCE[dtype]
    return dict(variant=variant, config=config or "default", M=M, dtype=str(dtype).removeprefix("torch."),
                bias=with_bias, error=error, unwritten=unwritten, border_intact=bool(border.isnan().all()), ok=ok)


def correctness_work(sizes: dict) -> list[tuple]:
    """(layer spec, seed, variant, config or None, M, dtype name, bias) of every correctness case."""
    from upq_kernels import dispatch

    work = []
    for variant, module in dispatch.VARIANTS.items():
        configs = [module.DEFAULT_CONFIG] + [c for c in module.CONFIGS if c != module.DEFAULT_CONFIG]
        # (a dry run takes the default only: tests/test_kernels.py runs every configuration under the interpreter)
        for config in configs[:sizes["configs_per_variant"]]:
            for M in sizes["rows"][variant]:
                work.append((sizes["main_layer"], 0, variant, config, M, "bfloat16", False))
    for spec in sizes["branch_layers"]:
        for variant in dispatch.VARIANTS:
            for dtype, with_bias in sizes["branch_dtypes"]:
                work.append((spec, 1, variant, None, sizes["rows"][variant][-1], dtype, with_bias))
    return work


def part_correctness(sizes: dict, device: str, shard: tuple[int, int] = (0, 1)) -> dict:
    cases, layers = [], {}
    for index, (spec, seed, variant, config, M, dtype, with_bias) in enumerate(correctness_work(sizes)):
        if index % shard[1] != shard[0]:
            continue
        name, bits, group, K, N = spec
        if (name, seed) not in layers:
            layers[name, seed] = make_layer(bits, group, K, N, device, seed=seed)
        layer, weight = layers[name, seed]
        result = check_one(variant, config, layer, weight, M, getattr(torch, dtype), with_bias, device)
        cases.append(dict(layer=name, **result))
    failed = [c for c in cases if not c["ok"]]
    return dict(cases=cases, total=len(cases), failed=len(failed))


def markdown_correctness(part: dict) -> list[str]:
    lines = [f"Correctness: {part['total'] - part['failed']} of {part['total']} cases pass "
             "(error = max |out - reference| / max |reference|).", "",
             "| layer | variant | config | M | dtype | bias | error | ok |", "|---|---|---|---:|---|---|---:|---|"]
    for c in part["cases"]:
        config = c["config"] if isinstance(c["config"], str) else ", ".join(f"{k}={v}" for k, v in c["config"].items())
        lines.append(f"| {c['layer']} | {c['variant']} | {config} | {c['M']} | {c['dtype']} | {'yes' if c['bias'] else ''} "
                     f"| {c['error']:.1e} | {'yes' if c['ok'] else '**NO**'} |")
    return lines


# ----------------------------------------------------------------------------------------------
# 2. Kernel grid
# ----------------------------------------------------------------------------------------------

def cpu_ms_per_call(calls: list, replays: int) -> float:
    if not ARGS.dry_run:  # warm-up (under the interpreter a call takes seconds: the dry run times one)
        for call in calls:
            call()
    times = []
    for _ in range(max(1, replays)):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(calls) * 1e3


def part_grid(sizes: dict, device: str, replays: int) -> dict:
    import upq_kernels
    from upq_kernels.common import PackedWeight

    rows = list(sizes["grid_rows"]) + ([4096] if ARGS.full and not ARGS.dry_run else [])
    formats = dict(sizes["formats"])
    if ARGS.full and not ARGS.dry_run:
        formats["INT4 g128"] = (4, 128)
    report = dict(rows=[])
    if device == "cuda":
        from bench_kernels import copy_bandwidth, graph_ms_per_call, l2_bytes

        flush = torch.empty(2 * l2_bytes(), dtype=torch.uint8, device="cuda")
        report["copy_bandwidth_gb_per_s"] = copy_bandwidth(flush) / 1e9
        rotate_bytes = 4 * l2_bytes()

        def ms_per_call(calls):
            return graph_ms_per_call(calls, replays, flush)
    else:
        rotate_bytes = 0

        def ms_per_call(calls):
            return cpu_ms_per_call(calls, replays)

    for K, N in sizes["shapes"]:
        dense_bytes = K * N * 2
        dense = [torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
                 for _ in range(max(2, -(-rotate_bytes // dense_bytes)) if device == "cuda" else 1)]
        for format_name, (bits, group) in formats.items():
            layer, _ = make_layer(bits, group, K, N, device, seed=K + N)
            layer_bytes = sum(t.numel() * t.element_size() for t in (layer["packed"], layer["scale"], layer["zero"])
                              if t is not None)
            copies = max(2, min(256, -(-rotate_bytes // layer_bytes))) if device == "cuda" else 1
            layers = [layer] + [{k: v.clone() if torch.is_tensor(v) else v for k, v in layer.items()}
                                for _ in range(copies - 1)]
            weight = PackedWeight(layer["packed"], layer["scale"], layer["zero"], bits, group, K)
            for M in rows:
                x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
                upq_ms = ms_per_call([lambda layer=layer: upq_kernels.upq_matmul(x, **layer) for layer in layers])
                dense_ms = ms_per_call([lambda w=w: F.linear(x, w) for w in dense])
                row = dict(format=format_name, K=K, N=N, M=M, variant=upq_kernels.choose_variant(M, weight),
                           upq_us=upq_ms * 1e3, bf16_us=dense_ms * 1e3, speedup=dense_ms / upq_ms,
                           target=TARGETS.get(M))
                row["met"] = None if row["target"] is None else row["speedup"] >= row["target"]
                if device == "cuda":
                    moved = layer_bytes + (M * K + M * N) * 2
                    row["upq_fraction_of_copy_bw"] = moved / (upq_ms * 1e-3) / (report["copy_bandwidth_gb_per_s"] * 1e9)
                report["rows"].append(row)
                print(f"  {format_name:13s} {K:>5d}x{N:<5d} M={M:<4d} {row['variant']:7s} {row['upq_us']:9.1f} us  "
                      f"bf16 {row['bf16_us']:9.1f} us  x{row['speedup']:.2f}", flush=True)
            del layers
        del dense
    return report


def markdown_grid(part: dict) -> list[str]:
    lines = []
    if "copy_bandwidth_gb_per_s" in part:
        lines += [f"Copy bandwidth measured in this run: {part['copy_bandwidth_gb_per_s']:.0f} GB/s.", ""]
    lines += ["| format | K x N | M | variant | UPQ (us) | bf16 cuBLAS (us) | speed-up | target | met |",
              "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in part["rows"]:
        target = "" if r["target"] is None else f">= {r['target']}x"
        met = "" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['format']} | {r['K']}x{r['N']} | {r['M']} | {r['variant']} | {r['upq_us']:.1f} | "
                     f"{r['bf16_us']:.1f} | {r['speedup']:.2f}x | {target} | {met} |")
    return lines


# ----------------------------------------------------------------------------------------------
# 3. Decode
# ----------------------------------------------------------------------------------------------

def decode_tokens_per_second(model, prompt_length: int, short: int, long: int, reps: int, device: str,
                             compile_mode: str) -> tuple[float, str]:
    """Greedy decode tokens/s, ``(long - short) / (t(long) - t(short))``; returns it and the mode that ran."""
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_length), device=device)
    eager_forward = model.forward
    mode = compile_mode if device == "cuda" else "none"
    if mode != "none":
        model.generation_config.cache_implementation = "static"
        if mode == "cudagraphs":
            model.forward = torch.compile(eager_forward, backend="cudagraphs", dynamic=False)
        else:
            model.forward = torch.compile(eager_forward, mode="reduce-overhead", dynamic=False)

    def seconds(new_tokens: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                disable_compile=True, pad_token_id=0)
        synchronize(device)
        assert output.shape[1] == prompt_length + new_tokens
        return time.perf_counter() - start

    try:
        with torch.no_grad():
            for new_tokens in (short, long):  # compile, tune, record the graphs for both lengths
                seconds(new_tokens)
            short_s = statistics.median(seconds(short) for _ in range(reps))
            long_s = statistics.median(seconds(long) for _ in range(reps))
    finally:
        model.forward = eager_forward
        if mode != "none":
            torch._dynamo.reset()
    return (long - short) / max(long_s - short_s, 1e-9), mode


def part_decode(sizes: dict, device: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import upq_hf

    spec = sizes["decode"]
    config = LLAMA_1B if spec["shape"] == "1b" else LLAMA_TINY
    torch.manual_seed(0)
    with torch.device(device):
        dense = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).eval()
    results = []

    def measure(name, model):
        try:
            tps, mode = decode_tokens_per_second(model, spec["prompt"], spec["short"], spec["long"], spec["reps"],
                                                 device, ARGS.decode_compile)
        except Exception as error:  # noqa: BLE001 - retry eager, say so
            print(f"  {name}: {ARGS.decode_compile} failed ({type(error).__name__}: {error}); eager instead", flush=True)
            tps, mode = decode_tokens_per_second(model, spec["prompt"], spec["short"], spec["long"], spec["reps"],
                                                 device, "none")
            mode = f"none (after {ARGS.decode_compile} failed: {type(error).__name__})"
        results.append(dict(model=name, decode_tokens_per_s=tps, compile=mode))
        print(f"  {name}: {tps:.1f} tokens/s ({mode})", flush=True)

    measure("bf16", dense)
    variants = [("INT2 per-row", None)] + ([("INT2 g128", 128 if spec["shape"] == "1b" else 32)]
                                           if ARGS.full or ARGS.dry_run else [])
    for name, group in variants:
        with torch.device(device):  # quantize where the model runs (round to nearest of 1 B weights: seconds on a GPU)
            model = LlamaForCausalLM(LlamaConfig(**config)).eval()
        model.load_state_dict({k: v.float() for k, v in dense.state_dict().items()})
        # backend: Triton on the GPU, named so that the compiled forward does not trace the automatic choice; in a
        # dry run the default (the CPU kernel: the interpreter would take minutes, and the kernels' code path is
        # the correctness part's)
        upq_hf.quantize_model(model, upq_hf.UPQConfig(bits=2, group_size=group, recipe="rtn", rtn={"scale_init": "max"},
                                                      backend="triton" if device == "cuda" else None), progress=False)
        model = model.to(device=device, dtype=torch.bfloat16).eval()
        measure(name, model)
        del model
    base = results[0]["decode_tokens_per_s"]
    for r in results:
        r["speedup"] = r["decode_tokens_per_s"] / base
        r["met"] = None if r["model"] == "bf16" else r["speedup"] >= 2.0
    return dict(shape=spec["shape"], rows=results)


def markdown_decode(part: dict) -> list[str]:
    lines = [f"Greedy decode, random-weight Llama ({part['shape']}-shaped), batch 1:", "",
             "| model | decode tokens/s | speed-up | target | compile |", "|---|---:|---:|---|---|"]
    for r in part["rows"]:
        target = "" if r["model"] == "bf16" else ">= 2x " + ("(met)" if r["met"] else "(not met)")
        lines.append(f"| {r['model']} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {target} | {r['compile']} |")
    return lines


# ----------------------------------------------------------------------------------------------
# 4. Training
# ----------------------------------------------------------------------------------------------

def part_train(sizes: dict, device: str) -> dict:
    from bench_train import measure

    spec = sizes["train"]
    return measure(spec["shape"], steps=max(2, ARGS.train_steps), warmup=1, batch=spec["batch"], seqlen=spec["seqlen"],
                   device=device, verbose=False)


def markdown_train(part: dict) -> list[str]:
    return ["Distill-QAT (INT2 g64, bf16 teacher, StepAdam), random tokens:", "",
            "| shape | batch x seqlen | s/step | tokens/s | peak memory |", "|---|---|---:|---:|---:|",
            f"| {part['shape']} ({part['params_b']:.2f} B) | {part['batch']} x {part['seqlen']} | "
            f"{part['seconds_per_step']:.2f} | {part['tokens_per_second']:.0f} | "
            f"{part.get('peak_gpu_gib', part['peak_rss_gib']):.1f} GiB |"]


# ----------------------------------------------------------------------------------------------
# 5. Several GPUs: Distill-QAT under DDP and FSDP2 against one process
# ----------------------------------------------------------------------------------------------

def part_distributed(sizes: dict, device: str) -> dict:
    """``examples/distributed_distill.py`` on one process and on ``min(GPUs, 2)`` processes with DDP and with FSDP2
    (the same global batch): the trained scales' largest difference from one process's. Needs 2 GPUs."""
    import subprocess

    from safetensors.torch import load_file

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus < 2:
        return {"skipped": f"{gpus} GPU{'s' if gpus != 1 else ''} visible: DDP and FSDP need 2"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_distill.py")
    out = os.path.join(ARGS.out, "distributed")
    result = {}
    for name, processes, extra in (("one", 1, []), ("ddp", 2, []), ("fsdp", 2, ["--fsdp"])):
        command = [sys.executable, script] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), script]
        started = time.perf_counter()
        run = subprocess.run([*command, "--out", os.path.join(out, name), "--steps", "4", *extra],
                             capture_output=True, text=True, timeout=300)
        result[name] = {"seconds": time.perf_counter() - started, "returncode": run.returncode,
                        "stderr": run.stderr[-1500:] if run.returncode else ""}
    one = load_file(os.path.join(out, "one", "trained.safetensors"))
    for name in ("ddp", "fsdp"):
        if result[name]["returncode"] == 0:
            other = load_file(os.path.join(out, name, "trained.safetensors"))
            result[name]["max_abs_diff"] = max(float((other[k] - one[k]).abs().max()) for k in one)
    return result


def markdown_distributed(part: dict) -> list[str]:
    if "skipped" in part:
        return [f"Distill-QAT on several GPUs: skipped ({part['skipped']})."]
    lines = ["Distill-QAT (examples/distributed_distill.py) on 2 GPUs against one process, same global batch:", "",
             "| run | s | trained scales: largest difference from one process |", "|---|---:|---:|"]
    for name in ("one", "ddp", "fsdp"):
        row = part[name]
        diff = row.get("max_abs_diff")
        status = f"{diff:.2e}" if diff is not None else ("-" if name == "one" else f"failed: {row['stderr'][-200:]}")
        lines.append(f"| {name} | {row['seconds']:.0f} | {status} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Compiling ahead of the run, in parallel
# ----------------------------------------------------------------------------------------------

def kernel_launches(sizes: dict) -> list[tuple]:
    """(bits, group_size, K, N, M, variant, config) of every kernel the grid and the decode will compile: for
    each shape and row count, every candidate configuration of the variant the dispatcher picks (the tuner
    tries them all), or the dequantization kernel's default."""
    import upq_kernels
    from upq_kernels.common import PackedWeight
    from upq_kernels.dispatch import VARIANTS

    formats = dict(sizes["formats"])
    if ARGS.full:
        formats["INT4 g128"] = (4, 128)
    rows = list(sizes["grid_rows"]) + ([4096] if ARGS.full else [])
    jobs = [(bits, group, K, N, M) for K, N in sizes["shapes"] for bits, group in formats.values() for M in rows]
    if sizes["decode"]["shape"] == "1b":
        hidden, mlp, kv = LLAMA_1B["hidden_size"], LLAMA_1B["intermediate_size"], 256
        for group in [None] + ([128] if ARGS.full else []):
            for K, N in [(hidden, hidden), (hidden, kv), (hidden, mlp), (mlp, hidden)]:
                for M in (1, sizes["decode"]["prompt"]):
                    jobs.append((2, group, K, N, M))
    out = []
    for bits, group, K, N, M in jobs:
        stand_in = PackedWeight(torch.empty(1, N, dtype=torch.int32), None, None, bits, group, K)
        variant = upq_kernels.choose_variant(M, stand_in)
        if variant == "dequant":
            out.append((bits, group, K, N, M, variant, None))
            continue
        module, seen = VARIANTS[variant], []
        for config in [module.DEFAULT_CONFIG] + module.CONFIGS:
            fitted = module.fit_config(config, M, stand_in)
            if fitted is not None and fitted not in seen:
                seen.append(fitted)
                out.append((bits, group, K, N, M, variant, config))
    return out


def warm(sizes: dict, device: str, shard: tuple[int, int]) -> None:
    """A compile worker: launch its share of the kernels once each (Triton keeps the binaries in its on-disk
    cache, where the main process finds them), tuning off."""
    import upq_kernels
    from bench_kernels import random_packed_layer

    os.environ["UPQ_AUTOTUNE"] = "0"
    part_correctness(sizes, device, shard)
    for index, (bits, group, K, N, M, variant, config) in enumerate(kernel_launches(sizes)):
        if index % shard[1] == shard[0]:
            layer = random_packed_layer(bits, group, K, N)
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            upq_kernels.upq_matmul(x, **layer, variant=variant, config=config)
    synchronize(device)


def precompile(workers: int) -> dict:
    import subprocess

    start = time.perf_counter()
    command = [sys.executable, os.path.abspath(__file__), "--out", ARGS.out] + (["--full"] if ARGS.full else [])
    processes = [subprocess.Popen(command + ["--warm-shard", f"{i}/{workers}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(workers)]
    failures = []
    for process in processes:
        output, _ = process.communicate()
        if process.returncode:
            failures.append(output[-2000:])
    return dict(workers=workers, seconds=time.perf_counter() - start, failures=failures)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

PARTS = {"correctness": (part_correctness, markdown_correctness), "grid": (part_grid, markdown_grid),
         "decode": (part_decode, markdown_decode), "train": (part_train, markdown_train),
         "distributed": (part_distributed, markdown_distributed)}


def environment(device: str) -> dict:
    import transformers
    import triton

    info = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                dry_run=ARGS.dry_run, date=time.strftime("%Y-%m-%d %H:%M:%S"), host=platform.node(),
                interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    if device == "cuda":
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def main() -> int:
    device = ARGS.device
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--dry-run runs the same code paths on the CPU", file=sys.stderr)
        return 2
    os.makedirs(ARGS.out, exist_ok=True)
    os.environ.setdefault("UPQ_KERNEL_CACHE", os.path.abspath(ARGS.out))  # tuned configs land next to the report
    start = time.perf_counter()
    sizes = DRY if ARGS.dry_run else REAL
    if ARGS.warm_shard:
        warm(sizes, device, tuple(map(int, ARGS.warm_shard.split("/"))))
        return 0
    report = dict(environment=environment(device), parts={}, seconds={}, skipped=[], errors={})
    if ARGS.compile_workers:
        print(f"== compiling the kernels in {ARGS.compile_workers} processes", flush=True)
        report["precompile"] = precompile(ARGS.compile_workers)
        print(f"  ({report['precompile']['seconds']:.0f} s, {len(report['precompile']['failures'])} workers failed)",
              flush=True)
        for failure in report["precompile"]["failures"]:
            print(failure, flush=True)
    for name in [p.strip() for p in ARGS.parts.split(",") if p.strip()]:
        run, _ = PARTS[name]
        if time.perf_counter() - start > ARGS.budget_s:
            report["skipped"].append(name)
            print(f"== {name}: skipped, past the {ARGS.budget_s:.0f} s budget", flush=True)
            continue
        print(f"== {name}", flush=True)
        part_start = time.perf_counter()
        try:
            if name == "grid":
                report["parts"][name] = run(sizes, device, ARGS.replays)
            else:
                report["parts"][name] = run(sizes, device)
        except Exception as error:  # noqa: BLE001 - report it and go on with the other parts
            report["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
            print(f"  {name} failed: {type(error).__name__}: {error}", flush=True)
        report["seconds"][name] = time.perf_counter() - part_start
        print(f"  ({report['seconds'][name]:.0f} s)", flush=True)
    report["seconds"]["total"] = time.perf_counter() - start

    env = report["environment"]
    lines = [f"# UPQ GPU check{' (dry run on the CPU: timings meaningless)' if ARGS.dry_run else ''}", "",
             f"{env['device']}{' (sm_' + env['capability'].replace('.', '') + ')' if 'capability' in env else ''}; "
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; {env['date']}; "
             f"{report['seconds']['total']:.0f} s in all"
             + (f", of which {report['precompile']['seconds']:.0f} s compiling the kernels in "
                f"{report['precompile']['workers']} processes" if "precompile" in report else "") + ".", ""]
    for name, part in report["parts"].items():
        lines += [f"## {name} ({report['seconds'][name]:.0f} s)", ""] + PARTS[name][1](part) + [""]
    for name, error in report["errors"].items():
        lines += [f"## {name}: FAILED", "", "```", error.strip(), "```", ""]
    for name in report["skipped"]:
        lines += [f"## {name}: skipped (past the time budget)", ""]
    from upq_hf.atomic import write_text

    write_text(os.path.join(ARGS.out, "gpu_check.md"), "\n".join(lines))
    write_text(os.path.join(ARGS.out, "gpu_check.json"), json.dumps(report, indent=1, default=str))
    print("\n".join(lines))
    correctness = report["parts"].get("correctness")
    return 1 if report["errors"] or (correctness and correctness["failed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
