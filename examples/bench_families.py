"""The family matrix in numbers: every family of ``tests/families.py`` quantized on load, at a small width.

Each family is built with random weights at hidden 256 (4 heads of 64, 2 key/value heads where grouped,
FFN 512, MoE: 4 experts of 256, 2 active), 2 blocks, and quantized on load with ``UPQConfig(bits=2,
group_size=64)`` and with the ``kv4`` mix. Printed per family: quantized layers, the share of the decoder's
weights quantized (the routers are what MoE models keep dense), bits per weight of the quantized layers (codes
and scales) for uniform INT2 and for ``kv4``, and how many layers ``kv4`` put at INT4 (k and v, found by role).

    python examples/bench_families.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

WIDTH = dict(hidden_size=256, intermediate_size=512)
SIZES = dict(head_dim=64, moe_intermediate_size=256, shared_expert_intermediate_size=512, ffn_dim=512)  # where set


def main() -> int:
    import transformers
    from families import FAMILIES, build
    from transformers import AutoModelForCausalLM

    from upq_hf import UPQConfig, adapters
    from upq_hf.convert import upq_layers

    transformers.logging.set_verbosity_error()
    print("| family | quantized layers | decoder weights quantized | dense (documented) | INT2 g64 bits/weight "
          "| kv4 bits/weight | kv4 layers at INT4 |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for family in FAMILIES:
        extra = {**family.extra, **WIDTH, **{k: v for k, v in SIZES.items() if k in family.extra}}
        wide = type(family)(family.name, family.model_type, family.layout, extra, family.moe)
        with tempfile.TemporaryDirectory() as folder:
            build(wide).save_pretrained(folder)
            row = []
            for mix in (None, "kv4"):
                model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=UPQConfig(
                    bits=2, group_size=64, mix=mix))
                layers = upq_layers(model)
                weights = sum(m.in_features * m.out_features for m in layers.values())
                bits = sum(m.bits_per_weight * m.in_features * m.out_features for m in layers.values()) / weights
                row.append((len(layers), adapters.quantized_fraction(model),
                            sorted({w.reason for w in adapters.dense_decoder_weights(model)}), bits,
                            sum(m.bits == 4 for m in layers.values())))
        (n, fraction, dense, int2_bits, _), (_, _, _, kv4_bits, at_int4) = row
        print(f"| {family.name} | {n} | {fraction:.2%} | {', '.join(dense) or '-'} | {int2_bits:.3f} | "
              f"{kv4_bits:.3f} | {at_int4} |", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
