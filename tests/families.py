"""The model families UPQ is tested on: tiny random configs (no hub), and the README's "Supported models" table.

``FAMILIES`` is the one list: ``tests/test_families.py`` runs every check on every family in it, and
:func:`supported_models_table` renders the README's table from it and from the columns those tests check
(``test_readme_table_is_the_matrix`` fails when the README's copy differs). ``python tests/families.py`` prints
the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# every family: hidden 64, 4 attention heads of 16, 2 key/value heads where the family has them, 2 blocks
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_experts_per_tok=2)


@dataclass(frozen=True)
class Family:
    """``model_type`` built from :data:`COMMON` plus ``extra``; ``layout``: how it holds its weights (the README's
    words); ``kv``: the roles a mix finds k/v by (``"k_proj"/"v_proj"`` layers, or rows of a fused projection)."""

    name: str
    model_type: str
    layout: str
    extra: dict = field(default_factory=dict)
    moe: bool = False


FAMILIES = [
    Family("Llama", "llama", "nn.Linear"),
    Family("Mistral", "mistral", "nn.Linear"),
    Family("Qwen2", "qwen2", "nn.Linear, q/k/v bias"),
    Family("Qwen3", "qwen3", "nn.Linear, q/k norm", {"head_dim": 16}),
    Family("Gemma2", "gemma2", "nn.Linear, tied embeddings, extra norms", {"head_dim": 16}),
    Family("Gemma3", "gemma3_text", "nn.Linear, tied embeddings, extra norms", {"head_dim": 16}),
    Family("Phi-3", "phi3", "fused qkv_proj and gate_up_proj (rows by role)"),
    Family("GPT-NeoX", "gpt_neox", "fused query_key_value, heads interleaved"),
    Family("Falcon", "falcon", "fused query_key_value, multi-query"),
    Family("Bloom", "bloom", "fused query_key_value, heads interleaved"),
    Family("GPT-2", "gpt2", "Conv1D (transposed), fused c_attn"),
    Family("GPT-BigCode", "gpt_bigcode", "fused c_attn, multi-query"),
    Family("OPT", "opt", "nn.Linear", {"ffn_dim": 128}),
    Family("OLMo2", "olmo2", "nn.Linear, q/k norm"),
    Family("StableLM", "stablelm", "nn.Linear"),
    Family("Granite", "granite", "nn.Linear"),
    Family("Mixtral", "mixtral", "fused experts (3-D), router",
           {"num_local_experts": 4, "num_experts_per_tok": 2}, moe=True),
    Family("Qwen3-MoE", "qwen3_moe", "fused experts (3-D), router",
           {**MOE, "moe_intermediate_size": 32, "head_dim": 16}, moe=True),
    Family("Qwen2-MoE", "qwen2_moe", "fused experts (3-D), router, shared expert and its gate",
           {**MOE, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}, moe=True),
    Family("OLMoE", "olmoe", "fused experts (3-D), router", MOE, moe=True),
    Family("GPT-OSS", "gpt_oss", "fused experts, transposed, with biases and a clamped gate; router with bias",
           {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"]}, moe=True),
]

#: the README table's columns, each checked for every family by tests/test_families.py
COLUMNS = {
    "rtn": "INT2 and INT4 round to nearest on load; save, plain from_pretrained, logits bit-equal; generate",
    "ptq": "block-wise PTQ (INT2) at a tiny budget",
    "upq": "the upq recipe (INT4 PTQ, INT2 reconstruction, Distill-QAT) at a tiny budget",
    "kv4 mix": "k/v at INT4 by role, fused or not",
    "LoRA": "PEFT LoRA trains with the codes unchanged",
    "backends": "torch reference; avx2 CPU kernel equal to it",
}


def build(family: Family, vocab_size: int = 128, seed: int = 0):
    """The tiny random model of ``family`` (eval mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family.model_type, **{**COMMON, "vocab_size": vocab_size, **family.extra})
    return AutoModelForCausalLM.from_config(config).eval()


def supported_models_table() -> str:
    """The README's "Supported models" table: every family of :data:`FAMILIES`, every column of :data:`COLUMNS`."""
    lines = ["| family | how it holds its weights | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for family in FAMILIES:
        lines.append(f"| {family.name} | {family.layout} | " + " | ".join("yes" for _ in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(supported_models_table())
