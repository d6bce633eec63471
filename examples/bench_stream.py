"""Peak memory and time of ``upq quantize --recipe upq`` in memory and streamed from disk (issue 33).

Builds the model shapes locally with random weights and the bundled tokenizer, saved once in bf16 (``1b``:
TinyLlama-1.1B's shape, ``3b``: Llama-3.2-3B's; ``135m``: the bundled SmolLM2-135M-Instruct, real weights, a
float32 file), then runs ``upq quantize DIR --bits 2 --recipe upq --stream on|off --config CONFIG`` in a child
process while sampling its ``/proc/PID/status`` every 0.2 s. Prints a markdown table: peak RSS (``VmRSS``: what
the process holds, its anonymous memory and any file pages it maps) and peak ``RssAnon`` against the checkpoint's
size in bf16, wall time, and from the run's own log the seconds per calibration token of block-wise PTQ (both
passes, at the config's steps) and per training token of Distill-QAT.

    python examples/bench_stream.py --shape 1b --modes off,on --config examples/configs/stream-reduced.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True, rms_norm_eps=1e-5),
}


def build(shape: str, path: str) -> str:
    """The checkpoint of ``shape`` at ``path`` (built once); the bundled model's folder for ``135m``."""
    from upq_hf.models import bundled_model_dir, load_tokenizer

    if shape == "135m":
        return bundled_model_dir()
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, dtype="bfloat16", **SHAPES[shape])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bf16_bytes(path: str) -> int:
    from upq_hf.offload import SafetensorsIndex

    index = SafetensorsIndex.of_folder(path)
    return sum((e.end - e.start) * 2 // e.dtype.itemsize for e in index.entries.values())


def _status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def run(path: str, mode: str, config: str | None, out: str, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "upq_hf.cli", "quantize", path, "--bits", "2", "--recipe", "upq", "--stream",
               mode, "--out", out, "--overwrite", *(["--config", config] if config else []), *extra]
    log_path = f"{out}.log"
    started = time.time()
    peak = {"VmRSS": 0, "RssAnon": 0}
    at_peak = {"log_bytes": 0, "seconds": 0.0}  # where the log stood when VmRSS peaked: the phase that peaks
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            while not done.is_set():
                for key, value in _status(child.pid).items():
                    if key in peak and value > peak[key]:
                        peak[key] = value
                        if key == "VmRSS":
                            log.flush()
                            at_peak.update(log_bytes=os.path.getsize(log_path), seconds=time.time() - started)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        done.set()
        sampler.join()
    wall = time.time() - started
    text = open(log_path, errors="replace").read()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log_path}")
    before = open(log_path, "rb").read()[:at_peak["log_bytes"]].decode(errors="replace")
    phase = next((line.strip() for line in reversed(re.split(r"[\r\n]", before)) if line.strip()), "start")
    ptq = sum(float(s) for s in re.findall(r"\[upq\] (?:streamed )?PTQ[^\n]*?, ([\d.]+) s(?: \(capture|\n)", text))
    trained = re.search(r"trained in (\d+) s \((\d+) tokens/s\)", text)
    samples = re.search(r"(\d+)x(\d+) tokens", text)
    tokens = int(samples.group(1)) * int(samples.group(2)) if samples else 0
    return {"mode": mode, "peak_rss": peak["VmRSS"], "peak_anon": peak["RssAnon"],
            "ru_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "wall": wall,
            "ptq_seconds": ptq, "calibration_tokens": tokens,
            "s_per_calibration_token": ptq / tokens if tokens else None,
            "s_per_training_token": 1 / int(trained.group(2)) if trained else None, "log": log_path,
            "peak_at_s": round(at_peak["seconds"]), "peak_during": phase[-160:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["135m", *SHAPES], default="1b")
    parser.add_argument("--path", default=None, help="where the shape's checkpoint is built (default /tmp/upq-SHAPE)")
    parser.add_argument("--modes", default="off,on", help="--stream values to run, in order")
    parser.add_argument("--config", default=None, help="--config FILE for upq quantize (a reduced budget)")
    parser.add_argument("--out", default="out/stream", help="folder for the checkpoints and logs")
    parser.add_argument("--fidelity-prompts", type=int, default=4)
    args = parser.parse_args()
    path = build(args.shape, args.path or f"/tmp/upq-{args.shape}")
    size = bf16_bytes(path)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        result = run(path, mode, args.config, os.path.join(args.out, f"{args.shape}-{mode}"),
                     ["--fidelity-prompts", str(args.fidelity_prompts)])
        rows.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{args.shape} ({path}), bf16 size {size / 2**30:.2f} GiB, config {args.config or 'default'}\n")
    print("| --stream | peak RSS GiB | x bf16 file | peak RssAnon GiB | wall s | PTQ s | s / calibration token "
          "| s / training token |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / size:.2f} | "
              f"{r['peak_anon'] / 2**30:.2f} | {r['wall']:.0f} | {r['ptq_seconds']:.0f} | "
              f"{r['s_per_calibration_token'] or float('nan'):.4f} | {r['s_per_training_token'] or float('nan'):.4f} |")
    for r in rows:
        print(f"\n--stream {r['mode']}: VmRSS peaked {r['peak_at_s']} s in, the log then at: {r['peak_during']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
