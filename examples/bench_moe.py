"""An MoE-shaped model through upq_hf: bits per weight and file size, quantize-on-load memory, decode speed.

Builds a Mixtral-shaped model locally with random weights (``MixtralConfig``: 8 experts, 2 active per token,
hidden 1024, expert FFN 2048, 12 blocks, 16 heads of 64, 4 KV heads, the bundled tokenizer's vocabulary of
49152; about 0.73B parameters, 0.19B active per token), saves it once in bf16 (default ``/tmp/upq-bench-moe``),
then:

* size: the bf16 checkpoint against ``UPQConfig(bits=2, group_size=64)`` quantized on load (every expert, the
  attention; the routers, embeddings and head stay bf16) and the same at INT4: file size, bits per weight of the
  quantized layers, the share of the decoder's weights quantized (``upq info``'s figures);
* memory: peak anonymous RSS of a fresh process loading the bf16 file dense and quantizing it on load
  (``examples/bench_load_memory.py``'s sampler), against the bf16 file's size;
* decode: greedy decoding of ``--tokens`` new tokens after a chat prompt, dense bf16 against the INT2 model
  (experts run one at a time, as many as the router picks: a loop over the active experts) on this CPU's
  automatic backend, interleaved rounds, median and best.

    python examples/bench_moe.py [--path /tmp/upq-bench-moe] [--threads 2] [--tokens 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

SHAPE = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
             tie_word_embeddings=False)


def build(path: str) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = MixtralConfig(vocab_size=len(tokenizer), dtype="bfloat16", **SHAPE)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = MixtralForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def sizes(path: str, out: str) -> list[dict]:
    from transformers import AutoModelForCausalLM

    import upq_hf  # noqa: F401
    from upq_hf import UPQConfig
    from upq_hf.checkpoint import checkpoint_info

    rows = [{"model": "dense bf16", "MiB": folder_bytes(path) / 2 ** 20, "bits_per_weight": 16.0,
             "decoder_quantized": 0.0}]
    for bits in (2, 4):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                     quantization_config=UPQConfig(bits=bits, group_size=64))
        target = os.path.join(out, f"int{bits}")
        model.save_pretrained(target)
        info = checkpoint_info(target)
        rows.append({"model": f"INT{bits} g64 (rtn on load)", "MiB": folder_bytes(target) / 2 ** 20,
                     "bits_per_weight": info["bits_per_weight"],
                     "decoder_quantized": info["decoder_quantized_fraction"],
                     "dense": sorted(set(info["decoder_dense_weights"].values()), key=str)})
    return rows


def memory(path: str) -> str:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_load_memory.py")
    result = subprocess.run([sys.executable, script, "--path", path, "--cases", "dense,dense-fp32,int2,int4"],
                            capture_output=True, text=True, check=True)
    return result.stdout


def decode(path: str, int2_path: str, tokens: int, runs: int) -> list[dict]:
    from bench_cpu import decode_prompt, interleaved_ms
    from transformers import AutoModelForCausalLM

    import upq_hf  # noqa: F401
    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    ids, settings = decode_prompt(tokenizer, tokens)
    models = {"dense bf16": AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(),
              "INT2 g64": AutoModelForCausalLM.from_pretrained(int2_path, dtype=torch.bfloat16).eval()}

    def run(model):
        return lambda: model.generate(ids, **settings)
    with torch.no_grad():
        times = interleaved_ms({name: run(model) for name, model in models.items()}, runs)
    dense_ms = times["dense bf16"][0]
    return [{"model": name, "tokens_per_s": tokens / (median / 1e3), "best_tokens_per_s": tokens / (best / 1e3),
             "x_dense": dense_ms / median} for name, (median, best) in times.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/tmp/upq-bench-moe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts", default="size,memory,decode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.path, "config.json")):
        print(f"building the Mixtral-shaped checkpoint in {args.path} (once)", file=sys.stderr)
        build(args.path)
    parts = args.parts.split(",")
    out = tempfile.mkdtemp(prefix="upq-bench-moe-")
    print(f"Mixtral-shaped model {json.dumps(SHAPE)}, bf16 file {folder_bytes(args.path) / 2 ** 30:.3f} GiB, "
          f"torch {torch.__version__}, {args.threads} threads\n")
    if "size" in parts or "decode" in parts:
        rows = sizes(args.path, out)
        print("| model | file MiB | bits per weight (quantized layers) | decoder weights quantized | kept dense |")
        print("|---|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['model']} | {r['MiB']:.1f} | {r['bits_per_weight']:.3f} | {r['decoder_quantized']:.1%} | "
                  f"{', '.join(x or 'unknown' for x in r.get('dense', [])) or '-'} |")
        print()
    if "memory" in parts:
        print(memory(args.path))
    if "decode" in parts:
        rows = decode(args.path, os.path.join(out, "int2"), args.tokens, args.runs)
        print(f"| greedy decode, {args.tokens} new tokens | tokens/s (median of {args.runs}) | best | x dense bf16 |")
        print("|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['tokens_per_s']:.2f} | {r['best_tokens_per_s']:.2f} | {r['x_dense']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
