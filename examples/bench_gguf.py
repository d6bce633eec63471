"""A UPQ checkpoint in llama.cpp: the exported GGUF's logits against upq_hf's, and decode speed side by side.

Builds llama.cpp from the llama-cpp-python source distribution (once, into ``--build``: ``pip download
--no-deps --no-binary :all: llama-cpp-python``, then cmake in ``vendor/llama.cpp`` for ``llama-bench`` and
``llama-quantize``; about 15 minutes on 2 cores) and the llama-cpp-python bindings into this environment (for
logits), then:

* exports the UPQ checkpoint ``CHECKPOINT`` with :func:`upq_hf.gguf_export.export_gguf` (dense tensors as F16 unless
  ``--dense-type``), and makes llama.cpp's own Q4_0 of the same dense model (``llama-quantize`` of the bundled
  GGUF, ``--allow-requantize``: the unquantized teacher's weights, as upq_hf loads them);
* fidelity: on the validation prompts' teacher answers (``upq_hf.prompts.VALIDATION_PROMPTS``), the exported
  GGUF's next-token logits in llama.cpp against upq_hf's own (the checkpoint in transformers, fp32, the torch
  backend), token by token: top-1 agreement and the largest logit difference (over all positions and at each
  sequence's first), beside llama.cpp against itself with an F32 KV cache instead of F16 (the noise floor of its
  own arithmetic), and each one's top-1 agreement with the teacher's answer tokens;
* speed: ``llama-bench -p 0 -n 64 -t THREADS`` for the exported GGUF and llama.cpp's Q4_0 (greedy decode,
  tokens/s), and the checkpoint's own decode in transformers (``generate``, 64 new tokens, bf16).

    python examples/bench_gguf.py CHECKPOINT [--threads 2] [--build /tmp/upq-llama.cpp] [--prompts 24] [--skip-speed]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import time


def build_llama_cpp(build: str) -> str:
    """llama.cpp's source tree under ``build`` with ``llama-bench`` and ``llama-quantize`` built; returns the tree."""
    trees = glob.glob(os.path.join(build, "llama_cpp_python-*", "vendor", "llama.cpp"))
    if not trees:
        os.makedirs(build, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "llama-cpp-python", "-d", build], check=True)
        with tarfile.open(glob.glob(os.path.join(build, "llama_cpp_python-*.tar.gz"))[0]) as archive:
            archive.extractall(build)
        trees = glob.glob(os.path.join(build, "llama_cpp_python-*", "vendor", "llama.cpp"))
    tree = trees[0]
    if not os.path.isfile(os.path.join(tree, "build", "bin", "llama-bench")):
        subprocess.run(["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF", "-DCMAKE_BUILD_TYPE=Release"], cwd=tree, check=True)
        subprocess.run(["cmake", "--build", "build", "-j2", "--target", "llama-bench", "llama-quantize"], cwd=tree,
                       check=True)
    return tree


def install_bindings(build: str) -> None:
    """llama-cpp-python into this environment (for logits), from the same source distribution."""
    try:
        import llama_cpp  # noqa: F401
        return
    except ImportError:
        pass
    source = glob.glob(os.path.join(build, "llama_cpp_python-*.tar.gz"))[0]
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", source], check=True, env=env)


def bench(tree: str, model: str, threads: int) -> float:
    """Greedy decode tokens/s of ``llama-bench -p 0 -n 64``."""
    out = subprocess.run([os.path.join(tree, "build", "bin", "llama-bench"), "-m", model, "-p", "0", "-n", "64",
                          "-t", str(threads), "-o", "json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def llama_logits(path: str, sequences: list[list[int]], threads: int, **options):
    """llama.cpp's logits of every position of each token sequence (a fresh context each); ``options`` go to
    ``llama_cpp.Llama`` (``type_k=0, type_v=0``: an F32 KV cache)."""
    import numpy as np
    from llama_cpp import Llama

    model = Llama(model_path=path, logits_all=True, n_ctx=512, n_threads=threads, verbose=False, **options)
    out = []
    for ids in sequences:
        model.reset()
        model.eval(ids)
        out.append(np.array(model.scores[: len(ids)], dtype=np.float32))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--build", default="/tmp/upq-llama.cpp")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--dense-type", default="F16", choices=["F16", "F32", "BF16"])
    parser.add_argument("--skip-speed", action="store_true", help="fidelity only")
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import upq_hf  # noqa: F401
    from upq_hf.evaluation import FidelityReference
    from upq_hf.gguf_export import export_gguf
    from upq_hf.models import bundled_gguf, load_model
    from upq_hf.prompts import VALIDATION_PROMPTS

    torch.set_num_threads(args.threads)
    tree = build_llama_cpp(args.build)
    install_bindings(args.build)
    ours = os.path.join(args.build, "upq.gguf")
    report = export_gguf(args.checkpoint, ours, fallback="error", dense_type=args.dense_type)
    print(report.summary())
    folder, name = bundled_gguf()
    q4_0 = os.path.join(args.build, "llama-q4_0.gguf")
    if not os.path.isfile(q4_0):
        subprocess.run([os.path.join(tree, "build", "bin", "llama-quantize"), "--allow-requantize",
                        os.path.join(folder, name), q4_0, "Q4_0"], check=True, capture_output=True)

    # fidelity: the same token sequences through upq_hf and through llama.cpp
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    teacher = load_model(None, dtype="float32")
    reference = FidelityReference.build(teacher, tokenizer, list(VALIDATION_PROMPTS[: args.prompts]),
                                        max_new_tokens=64, progress=False)
    sequences = [list(p) + list(a) for p, a in zip(reference.prompt_ids, reference.answer_ids)]
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "torch"
    theirs_all = llama_logits(ours, sequences, args.threads)
    starts = [len(p) - 1 for p in reference.prompt_ids]  # the logits that predict the teacher's answer tokens

    def teacher_top1(all_logits) -> float:
        hits = [int((logits[s:len(ids) - 1].argmax(-1) == np.array(ids[s + 1:])).sum())
                for logits, ids, s in zip(all_logits, sequences, starts)]
        return sum(hits) / sum(len(ids) - 1 - s for ids, s in zip(sequences, starts))

    def row(label, all_logits):
        agree = sum(int((mine.argmax(-1) == theirs.argmax(-1)).sum()) for mine, theirs in zip(all_logits, theirs_all))
        worst = max(float(np.abs(mine - theirs).max()) for mine, theirs in zip(all_logits, theirs_all))
        first = max(float(np.abs(mine[0] - theirs[0]).max()) for mine, theirs in zip(all_logits, theirs_all))
        print(f"| {label} | {agree / sum(map(len, sequences)):.4f} | {worst:.4f} | {first:.4f} | "
              f"{teacher_top1(all_logits):.4f} |", flush=True)

    print(f"\nfidelity, {len(sequences)} validation prompts with the teacher's answers, "
          f"{sum(map(len, sequences))} positions: each against llama.cpp's logits of the export (F16 KV cache), "
          f"and its top-1 agreement with the teacher's answer tokens")
    print("| logits | top-1 agreement with llama.cpp | largest logit difference | the same, first position only | "
          "top-1 with the teacher |\n|---|---:|---:|---:|---:|")
    row("llama.cpp, the export (itself)", theirs_all)
    row("llama.cpp, the export, F32 KV cache", llama_logits(ours, sequences, args.threads, type_k=0, type_v=0))
    with torch.no_grad():
        row("upq_hf, the checkpoint (fp32, the torch backend)",
            [model(torch.tensor([ids])).logits[0].numpy() for ids in sequences])
    if args.skip_speed:
        return 0
    print(f"\n| runtime and format | threads | tokens/s (64 new tokens) | file MiB |")
    print("|---|---:|---:|---:|")
    for label, path in (("llama.cpp, the UPQ checkpoint exported", ours), ("llama.cpp, its own Q4_0", q4_0)):
        print(f"| {label} | {args.threads} | {bench(tree, path, args.threads):.1f} | "
              f"{os.path.getsize(path) / 2 ** 20:.0f} |", flush=True)
    from upq_hf.chat import chat_prompt_ids

    ids = torch.tensor([chat_prompt_ids(tokenizer, "Write a short poem about the sea.")])
    for label, dtype in (("transformers + upq_hf, the checkpoint", torch.bfloat16),):
        student = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).eval()
        settings = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        student.generate(ids, **settings)
        started = time.perf_counter()
        student.generate(ids, **settings)
        print(f"| {label} (bf16) | {args.threads} | {64 / (time.perf_counter() - started):.1f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
