"""A 1B-shaped model trained on the Q2_K grid, exported to GGUF: bits per weight, and decode speed side by side.

Builds TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 22 blocks, 32 heads, 4 KV heads: every row a multiple of
256) with random weights and the bundled tokenizer's vocabulary, saves it once in bf16 (``--path``), then:

* quantizes it with ``UPQConfig(bits=2, group_size=16, scale_grid="q2_k", recipe="ptq")`` at a reduced budget
  (``--calibration`` sequences of 128 tokens of the built-in prompts' text, one epoch of block-wise PTQ): trained
  on the grid; saves the checkpoint;
* exports it (:func:`upq_hf.gguf_export.export_gguf`) and reads the bits per weight of its quantized tensors from
  the file;
* builds llama.cpp (``examples/bench_gguf.py``'s ``build_llama_cpp``), converts the dense model with llama.cpp's own
  converter (F16) and quantizes that to llama.cpp's own ``Q2_K`` and ``Q4_0``;
* times greedy decode, ``llama-bench -p 0 -n 64 -t THREADS``, for the three files, and ``generate`` of 64 new
  tokens in transformers for the UPQ checkpoint (on the exact automatic backend; on ``a8``, llama.cpp's int8
  activations, eager and with a compiled step) and the dense bf16 model.

    python examples/bench_q2k.py [--path /tmp/upq-bench-1b-q2k] [--threads 2] [--calibration 16] [--native]
        [--only-native]

``--native`` adds :class:`upq_hf.native.NativeDecoder` (the transformers model's decoder stack run in one C++ call
per token), exact and on ``a8``; ``--only-native`` times llama.cpp's rows and those two alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), dtype="bfloat16", **SHAPE))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def quantize(path: str, out: str, calibration: int) -> float:
    from transformers import AutoModelForCausalLM

    import upq_hf
    from upq_hf import UPQConfig
    from upq_hf.models import load_tokenizer
    from upq_hf.prompts import SEED_PROMPTS

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = UPQConfig(bits=2, group_size=16, scale_grid="q2_k", recipe="ptq",
                       data={"dataset": list(SEED_PROMPTS), "calibration_samples": calibration,
                             "calibration_seqlen": 128},
                       ptq={"epochs": 1, "batch_size": 4, "holdout": 0.0})
    started = time.time()
    upq_hf.quantize_model(model, config, tokenizer=tokenizer)
    seconds = time.time() - started
    model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return seconds


def file_bits(path: str) -> tuple[float, dict]:
    """Bits per weight of the quantized tensors of a GGUF file, and its tensor count per type."""
    from gguf import GGUFReader

    quantized = weights = 0
    kinds: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + 1
        if tensor.tensor_type.name.startswith("Q"):
            quantized += int(tensor.n_bytes)
            weights += int(tensor.n_elements)
    return 8 * quantized / max(1, weights), kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/tmp/upq-bench-1b-q2k")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--build", default="/tmp/upq-llama.cpp")
    parser.add_argument("--native", action="store_true", help="also time upq_hf.native.NativeDecoder (exact and a8)")
    parser.add_argument("--also", action="append", default=[], metavar="CHECKPOINT",
                        help="another INT2 checkpoint of the same shape for the native rows (e.g. groups of 64)")
    parser.add_argument("--only-native", action="store_true",
                        help="time llama.cpp's rows and the native decoder's, not transformers' generate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gguf import bench, build_llama_cpp

    from upq_hf.gguf_export import export_gguf

    dense = os.path.join(args.path, "dense")
    if not os.path.isfile(os.path.join(dense, "config.json")):
        build(dense)
    int2 = os.path.join(args.path, "int2-q2k")
    if not os.path.isfile(os.path.join(int2, "config.json")):
        print(f"quantized on the Q2_K grid in {quantize(dense, int2, args.calibration):.0f} s", file=sys.stderr)
    ours = os.path.join(args.path, "upq-q2k.gguf")
    report = export_gguf(int2, ours)
    bits, kinds = file_bits(ours)
    print(f"{report.summary()}\nquantized tensors: {bits:.4f} bits per weight ({kinds})")

    tree = build_llama_cpp(args.build)
    f16 = os.path.join(args.path, "dense-f16.gguf")
    if not os.path.isfile(f16):
        import importlib.util

        if importlib.util.find_spec("sentencepiece") is None:  # llama.cpp's Llama converter imports it
            raise SystemExit("llama.cpp's converter needs sentencepiece: pip install sentencepiece (for this "
                             "benchmark only; upq_hf does not need it)")
        subprocess.run([sys.executable, os.path.join(tree, "convert_hf_to_gguf.py"), dense, "--outfile", f16,
                        "--outtype", "f16"], check=True, capture_output=True)
    theirs = {}
    for kind in ("Q2_K", "Q4_0"):
        theirs[kind] = os.path.join(args.path, f"llama-{kind.lower()}.gguf")
        if not os.path.isfile(theirs[kind]):
            subprocess.run([os.path.join(tree, "build", "bin", "llama-quantize"), f16, theirs[kind], kind],
                           check=True, capture_output=True)
    print(f"\n| runtime and format | threads | tokens/s (64 new tokens) | file MiB | bits/weight (quantized) |")
    print("|---|---:|---:|---:|---:|")
    for label, path in (("llama.cpp, UPQ INT2 on the Q2_K grid, exported", ours),
                        ("llama.cpp, its own Q2_K", theirs["Q2_K"]), ("llama.cpp, its own Q4_0", theirs["Q4_0"])):
        print(f"| {label} | {args.threads} | {bench(tree, path, args.threads):.1f} | "
              f"{os.path.getsize(path) / 2 ** 20:.0f} | {file_bits(path)[0]:.3f} |", flush=True)
    from transformers import AutoModelForCausalLM

    import upq_hf  # noqa: F401
    from upq_hf.chat import chat_prompt_ids
    from upq_hf.models import load_tokenizer

    tokenizer = load_tokenizer(dense)
    ids = torch.tensor([chat_prompt_ids(tokenizer, "Write a short poem about the sea.")])
    settings = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    from bench_decode import compiled_settings

    arms = (("transformers + upq_hf, the INT2 checkpoint (bf16, exact: automatic backend)", int2, None, False),
            ("transformers + upq_hf, the same, `a8` (int8 activations and head, llama.cpp's trade)", int2, "a8", False),
            ("transformers + upq_hf, the same, `a8`, static cache + compiled step", int2, "a8", True),
            ("transformers, dense bf16", dense, None, False))
    if args.only_native:
        args.native, arms = True, ()
    if args.native:  # upq_hf.native.NativeDecoder: the decoder stack in one C++ call per token
        extra = tuple(arm for folder in args.also for arm in (
            (f"the same, `{folder}`, exact", folder, "avx2", "native"),
            (f"the same, `{folder}`, `a8`", folder, "a8", "native")))
        arms = (("transformers model + upq_hf native decode (exact)", int2, "avx2", "native"),
                ("transformers model + upq_hf native decode, `a8`", int2, "a8", "native")) + extra + arms
    for label, folder, backend, compiled in arms:
        os.environ.pop("UPQ_BACKEND", None)
        if backend:
            os.environ["UPQ_BACKEND"] = backend
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        if compiled == "native":
            from upq_hf.native import NativeDecoder

            decoder = NativeDecoder(model, max_length=ids.shape[1] + 64)
            decoder.generate(ids, max_new_tokens=4, eos_token_id=[])
            started = time.perf_counter()
            assert decoder.generate(ids, max_new_tokens=64, eos_token_id=[]).shape[1] == ids.shape[1] + 64
            whole = 64 / (time.perf_counter() - started)
            t = decoder.timings  # llama-bench -p 0 -n 64 times the new tokens alone: so does "after the prompt"
            print(f"| {label} | {args.threads} | {whole:.1f} ({63 / t['decode_s']:.1f} after the prompt of "
                  f"{t['prompt_tokens']} tokens, {t['prompt_tokens'] / t['prompt_s']:.0f} tokens/s) | - | - |",
                  flush=True)
            del decoder, model
            continue
        run = dict(settings, **(compiled_settings("default") if compiled else {}))
        # warm-up; a compiled step warms up on the very settings timed (a static cache of another length recompiles)
        model.generate(ids, **(run if compiled else dict(run, max_new_tokens=4, min_new_tokens=4)))
        started = time.perf_counter()
        model.generate(ids, **run)
        print(f"| {label} | {args.threads} | {64 / (time.perf_counter() - started):.1f} | - | - |", flush=True)
        del model
        torch._dynamo.reset()
    os.environ.pop("UPQ_BACKEND", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
