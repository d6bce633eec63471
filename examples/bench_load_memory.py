"""Peak memory of loading a 1B-shaped checkpoint with and without quantize-on-load.

Builds TinyLlama-1.1B's shape locally (``LlamaConfig``: hidden 2048, 22 layers, intermediate 5632, 32 heads,
4 KV heads, vocab 32000, untied head) with random weights, saves it once in bf16 (default
``/tmp/upq-bench-1b``), then loads it in a fresh process per case while a thread samples ``RssAnon`` from
``/proc/self/status`` every 2 ms (anonymous resident memory: the safetensors file's page cache, which the
kernel can drop, does not count). Cases:

* ``dense``: plain ``from_pretrained(dtype=bfloat16)``, the reference. The dtype is the file's, so the
  weights stay memory-mapped from the safetensors file (zero-copy): they are page cache, counted in
  RssFile as they are touched, and RssAnon barely moves. The dense model still needs the file's size in
  memory (page cache) to run;
* ``dense-fp32``: ``from_pretrained(dtype=float32)``, what the recipes that need the dense model load
  (``upq quantize`` loads float32): every weight is copied into anonymous memory;
* ``dense+rtn``: the dense load followed by ``upq_hf.quantize_model`` (what quantizing after loading costs,
  the memory path of the recipes that need the dense model);
* ``on-load int2 g64``: ``from_pretrained(quantization_config=UPQConfig(bits=2, group_size=64))``;
* ``on-load int4``: ``from_pretrained(quantization_config=UPQConfig(bits=4))`` (group size 64).

Prints a markdown table: peak RssAnon, the same less the process's RssAnon just before loading (Python,
torch, transformers), both against the bf16 file's size, the size of the loaded model's tensors, and the
peak RssFile (the checkpoint's pages mapped from the page cache: shown, not counted).

    python examples/bench_load_memory.py [--path /tmp/upq-bench-1b] [--cases dense,dense+rtn,int2,int4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {"dense": "dense bf16 (the file mapped, zero-copy)", "dense-fp32": "dense float32 (a copy)",
         "dense+rtn": "dense then quantize_model(UPQConfig(bits=2, group_size=64))",
         "int2": "on-load UPQConfig(bits=2, group_size=64)", "int4": "on-load UPQConfig(bits=4)"}


def rss(field: str = "RssAnon") -> int:
    """``RssAnon`` (or ``RssFile``) of this process from ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def rss_anon() -> int:
    return rss("RssAnon")


def build(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)


def measure(path: str, case: str) -> dict:
    """In this (fresh) process: load ``path`` the way ``case`` says, sampling RssAnon."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    import upq_hf
    from upq_hf import UPQConfig

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    baseline = rss_anon()
    peak = [baseline]
    peak_file = [rss("RssFile")]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            peak_file[0] = max(peak_file[0], rss("RssFile"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.time()
    if case == "dense":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif case == "dense-fp32":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif case == "dense+rtn":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        upq_hf.quantize_model(model, UPQConfig(bits=2, group_size=64), progress=False)
    elif case == "int2":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                     quantization_config=UPQConfig(bits=2, group_size=64))
    elif case == "int4":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=UPQConfig(bits=4))
    else:
        raise ValueError(f"unknown case {case!r}: one of {list(CASES)}")
    seconds = time.time() - started
    done.set()
    thread.join()
    peak[0] = max(peak[0], rss_anon())
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"case": case, "baseline": baseline, "peak": peak[0], "after": rss_anon(), "model_bytes": model_bytes,
            "peak_file": peak_file[0], "seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/tmp/upq-bench-1b")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON out
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.path, args.measure)))
        return 0
    if not os.path.isfile(os.path.join(args.path, "config.json")):
        print(f"building the 1B-shaped checkpoint in {args.path} (once)", file=sys.stderr)
        build(args.path)
    file_bytes = sum(os.path.getsize(os.path.join(args.path, f)) for f in os.listdir(args.path)
                     if f.endswith(".safetensors"))
    gib = 2 ** 30
    print(f"checkpoint {args.path}: {file_bytes / gib:.3f} GiB of bf16 safetensors\n")
    print("| case | peak RssAnon | x file | peak - before loading | x file | model tensors | peak RssFile "
          "(not counted) | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        result = subprocess.run([sys.executable, __file__, "--path", args.path, "--measure", case],
                                capture_output=True, text=True)
        if result.returncode:
            print(result.stderr[-2000:], file=sys.stderr)
            return result.returncode
        r = json.loads(result.stdout.strip().splitlines()[-1])
        grown = r["peak"] - r["baseline"]
        print(f"| {CASES[case]} | {r['peak'] / gib:.3f} GiB | {r['peak'] / file_bytes:.2f} | {grown / gib:.3f} GiB | "
              f"{grown / file_bytes:.2f} | {r['model_bytes'] / gib:.3f} GiB | "
              f"{r['peak_file'] / gib:.3f} GiB | {r['seconds']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
