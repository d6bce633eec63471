"""Decode speed in transformers: eager ``generate`` against a static KV cache and a compiled decode step.

For a UPQ checkpoint (default: round-to-nearest INT2 g64 of the bundled SmolLM2-135M-Instruct, made on load) and
its dense model, in bf16, on ``--threads`` threads, greedy decode of ``--tokens`` new tokens after a chat prompt:

* ``eager``: ``generate`` as it is (dynamic cache, the Python forward each token);
* ``compiled``: ``generate(cache_implementation="static", compile_config=...)``: transformers compiles the decode
  step (``torch.compile``, inductor; on the CPU only when the compile config says so); the UPQ layers enter the
  graph as the kernel's C++ operator ``upq_cpu::linear`` (or, where it did not build, the Python custom op
  ``upq_hf::cpu_linear``), opaque to the compiler, so the step compiles whole. Timed after a warm-up generation
  that compiles;
* ``compiled, C++ wrapper`` (``--cpp-wrapper``): the same with inductor's C++ wrapper, which makes the step's calls
  from C++ (the UPQ layers' operator included) instead of Python;
* ``native`` (``--native``): :class:`upq_hf.native.NativeDecoder`, the whole decoder stack in one C++ call per token
  (fp32 arithmetic, the model's output head), greedy, the same prompt and number of tokens; int8 activations where
  ``UPQ_BACKEND=a8`` says so. ``--skip-compiled`` leaves the compiled step out.

Also, ``--profile``: where a decode step of the UPQ model goes, eager and compiled (``torch.profiler``, top ops by
self CPU time), the answer to "is it the kernel or the Python around it".

    python examples/bench_decode.py [CHECKPOINT] [--threads 2] [--tokens 64] [--runs 3] [--profile] [--cpp-wrapper]
        [--attn eager] [--native] [--skip-compiled]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def timed(model, ids, settings, runs: int) -> tuple[float, float]:
    """(first call s, median tokens/s of ``runs`` later calls)."""
    started = time.perf_counter()
    model.generate(ids, **settings)
    first = time.perf_counter() - started
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.generate(ids, **settings)
        times.append(time.perf_counter() - started)
    return first, settings["max_new_tokens"] / statistics.median(times)


class _Native:
    """``generate`` of a :class:`upq_hf.native.NativeDecoder` with ``model.generate``'s timed settings (no end
    token: every run decodes ``max_new_tokens``)."""

    def __init__(self, decoder):
        self.decoder = decoder

    def generate(self, ids, max_new_tokens, **_):
        out = self.decoder.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=[])
        assert out.shape[1] == ids.shape[1] + max_new_tokens
        return out


def compiled_settings(mode: str, cpp_wrapper: bool = False) -> dict:
    """``generate`` settings for a static cache and a compiled decode step on the CPU (transformers compiles by
    itself only on accelerators: ``_compile_all_devices`` lifts that). ``cpp_wrapper``: inductor's C++ wrapper (the
    step's calls made from C++, not Python; torch.compile takes options or a mode, not both)."""
    from transformers import CompileConfig

    config = (CompileConfig(fullgraph=True, mode=None, options={"cpp_wrapper": True}) if cpp_wrapper else
              CompileConfig(fullgraph=True, mode=mode))
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def profile(model, ids, mode: str) -> str:
    """Profiles of 10 decode steps of ``model``: eager (dynamic cache) and compiled (a static cache of 256)."""
    from torch.profiler import ProfilerActivity, profile as run_profile
    from transformers import StaticCache

    tables = []
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
        step = ids[:, -1:]

        def eager(position):
            model(step, past_key_values=past, use_cache=True)
            past.crop(-1)

        cache = StaticCache(config=model.config, max_cache_len=256)
        model(ids, past_key_values=cache, use_cache=True)
        compiled = torch.compile(lambda position: model(step, past_key_values=cache, use_cache=True,
                                                        cache_position=torch.tensor([position])).logits,
                                 fullgraph=True, mode=mode)
        for name, function in (("eager", eager), ("compiled", compiled)):
            for position in range(3):
                function(ids.shape[1] + position)
            started = time.perf_counter()
            for position in range(20):
                function(ids.shape[1] + position)
            per_step = (time.perf_counter() - started) / 20 * 1e3
            with run_profile(activities=[ProfilerActivity.CPU]) as prof:
                for position in range(10):
                    function(ids.shape[1] + position)
            tables.append(f"{name} decode step: {per_step:.1f} ms; 10 steps profiled:\n"
                          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return "\n".join(tables)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--mode", default="default", help="torch.compile mode of the decode step")
    parser.add_argument("--skip-dense", action="store_true", help="time the UPQ checkpoint alone")
    parser.add_argument("--dense", default=None,
                        help="the unquantized model (default: the bundled one; e.g. bench_stream's /tmp/upq-1b)")
    parser.add_argument("--attn", default=None, choices=["sdpa", "eager"],
                        help="transformers' attention implementation (default: the model's, sdpa)")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="also time the compiled step with inductor's C++ wrapper")
    parser.add_argument("--native", action="store_true", help="also time upq_hf.native.NativeDecoder")
    parser.add_argument("--skip-compiled", action="store_true", help="leave the compiled decode step out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    import upq_hf  # noqa: F401
    from upq_hf import UPQConfig
    from upq_hf.chat import chat_prompt_ids
    from upq_hf.models import bundled_model_dir, load_tokenizer

    source = args.dense or bundled_model_dir()
    tokenizer = load_tokenizer(source)
    ids = torch.tensor([chat_prompt_ids(tokenizer, "Write a short poem about the sea.")])
    settings = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)
    load = dict(dtype=torch.bfloat16, **({"attn_implementation": args.attn} if args.attn else {}))
    models = {} if args.skip_dense else {"dense bf16": AutoModelForCausalLM.from_pretrained(source, **load).eval()}
    label = args.checkpoint or "RTN INT2 g64"
    models[f"UPQ {label}"] = (AutoModelForCausalLM.from_pretrained(args.checkpoint, **load)
                              if args.checkpoint else AutoModelForCausalLM.from_pretrained(
                                  source, quantization_config=UPQConfig(bits=2, group_size=64), **load))
    if args.profile:
        print(profile(models[f"UPQ {label}"], ids, args.mode))
    variants = [] if args.skip_compiled else [("compiled", compiled_settings(args.mode))]
    if args.cpp_wrapper:
        variants.append(("compiled, C++ wrapper", compiled_settings(args.mode, cpp_wrapper=True)))
    print("| model | eager tokens/s | " + " | ".join(f"{name} tokens/s | x eager | first call s" for name, _ in variants)
          + (" | native tokens/s | x eager" if args.native else "") + " |")
    print("|---|---:|" + "---:|---:|---:|" * len(variants) + ("---:|---:|" if args.native else ""))
    with torch.no_grad():
        for name, model in models.items():
            _, eager = timed(model, ids, settings, args.runs)
            cells = [f"{eager:.1f}"]
            for _, extra in variants:
                torch._dynamo.reset()
                first, compiled = timed(model, ids, {**settings, **extra}, args.runs)
                cells += [f"{compiled:.1f}", f"{compiled / eager:.2f}", f"{first:.0f}"]
            if args.native:
                from upq_hf.native import NativeDecoder

                decoder = NativeDecoder(model, max_length=ids.shape[1] + args.tokens)
                _, native = timed(_Native(decoder), ids, settings, args.runs)
                cells += [f"{native:.1f}", f"{native / eager:.2f}"]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
