"""A rotation of the residual stream fused into the weights (QuaRot's and SpinQuant's R1), before quantizing.

A pre-norm decoder with RMSNorm computes the same function when its residual stream is turned by an orthogonal
matrix ``Q``: the embeddings become ``E Q``, every layer that reads the stream (attention q/k/v, MLP gate/up, the
head) ``W Q``, every layer that writes it (attention o, MLP down) ``Q^T W``, once each norm's weight is folded into
the layers that read its output (RMSNorm of ``h Q`` is RMSNorm of ``h``, turned, when its weight is all ones). The
rotated layers' columns mix every direction of the stream, so the few massive activation channels and the weights
that serve them no longer set a group's scale alone: what low-bit groups need. Nothing runs at inference: the rotated
model is a plain checkpoint of its family (norm weights of one; a tied head untied, as the final norm folds into it).

``Q`` is a Hadamard matrix with random signs (:func:`hadamard`: Sylvester's 2^k, Paley's 12 and 20 and their
Kronecker products: 576 = 12 x 12 x 4, 960 = 20 x 12 x 4, 3072 = 12 x 256), or, where none of those has the
stream's width, a random orthogonal matrix. :func:`rotate_residual` does it in float64 and casts back (exact to the
model's rounding); :func:`rotation_problem` says why a model cannot be rotated (layer norms with a mean, norms after
the sublayers, experts), or None.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

#: orders of the Paley (type I) Hadamard matrices built here: q + 1 for primes q = 3 mod 4
_PALEY_PRIMES = (3, 7, 11, 19, 23, 31, 43, 47)
ROTATIONS = ("hadamard",)
#: RMSNorm classes of the families the rotation supports: ``x / rms(x) * weight`` over the whole hidden size
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "GraniteRMSNorm",
              "MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm")
_READERS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj", "qkv_proj")),
            "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj", "gate_up_proj"))}
_WRITERS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    residues = {(x * x) % q for x in range(1, q)}
    jacobsthal = torch.tensor([[0 if i == j else (1 if (j - i) % q in residues else -1) for j in range(q)]
                               for i in range(q)], dtype=torch.float64)
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1
    core[1:, 0] = -1
    core[1:, 1:] = jacobsthal
    return core + torch.eye(q + 1, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _hadamard_unscaled(n: int) -> torch.Tensor | None:
    """A ``+-1`` matrix ``H`` of order ``n`` with ``H H^T = n I`` from the constructions above, or None."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    for q in _PALEY_PRIMES:
        if n == q + 1:
            return _paley(q)
    if n % 2 == 0 and (half := _hadamard_unscaled(n // 2)) is not None:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), half)
    for q in _PALEY_PRIMES:
        if n % (q + 1) == 0 and (rest := _hadamard_unscaled(n // (q + 1))) is not None:
            return torch.kron(_paley(q), rest)
    return None


def hadamard(n: int, seed: int = 0) -> torch.Tensor | None:
    """An orthogonal ``n x n`` float64 matrix: a Hadamard matrix scaled by ``1/sqrt(n)``, its rows' signs drawn from
    ``seed``; None where no construction here has order ``n``."""
    base = _hadamard_unscaled(n)
    if base is None:
        return None
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return signs[:, None] * base / n ** 0.5


def orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """:func:`hadamard` where it exists, else a random orthogonal matrix (QR of a seeded Gaussian), float64."""
    rotation = hadamard(n, seed)
    if rotation is None:
        gaussian = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        rotation = q * torch.sign(torch.diagonal(r))[None, :]
    return rotation


def _parts(model: nn.Module):
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    return base, layers


def rotation_problem(model: nn.Module) -> str | None:
    """Why the residual rotation cannot be fused into ``model``'s weights, or None."""
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    base, layers = _parts(model)
    if base is None or layers is None or not hasattr(base, "embed_tokens") or not hasattr(base, "norm") \
            or model.get_output_embeddings() is None:
        return f"{family}: not a decoder with model.embed_tokens, model.layers, model.norm and an output head"
    norms = [base.norm] + [getattr(layer, name, None) for layer in layers for name in _READERS]
    odd = next((n for n in norms if type(n).__name__ not in _RMS_NORMS), False)
    if odd is not False:
        return (f"{family}: its normalisation layers ({type(odd).__name__}) are not pre-norm RMSNorms whose weight "
                f"folds into the next layer (supported: {', '.join(n[:-7] for n in _RMS_NORMS[:6])})")
    for layer in layers:
        extra = [name for name, module in layer.named_children() if "norm" in name and name not in _READERS]
        if extra:
            return f"{family}: its blocks have norms after their sublayers ({extra[0]}); the rotation needs pre-norms"
        for part, names in _READERS.values():
            if not any(isinstance(getattr(getattr(layer, part, None), name, None), nn.Linear) for name in names):
                return f"{family}: no linear {part}.{'/'.join(names)} reads the stream (experts are not supported yet)"
        for part, name in _WRITERS:
            if not isinstance(getattr(getattr(layer, part, None), name, None), nn.Linear):
                return f"{family}: no linear {part}.{name} writes the stream (experts are not supported yet)"
    return None


def resolve(model: nn.Module, config) -> tuple[str | None, str | None]:
    """``config.rotation`` for ``model``: ``"auto"`` becomes ``"hadamard"`` where :func:`rotation_problem` finds
    none, else None; the config is updated (what the checkpoint saves says what was done). Returns the rotation
    and, where ``"auto"`` declined, why."""
    if getattr(config, "rotation", None) != "auto":
        return getattr(config, "rotation", None), None
    problem = rotation_problem(model)
    config.rotation = None if problem else ROTATIONS[0]
    return config.rotation, problem


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Fuse a rotation of the residual stream into ``model``'s weights in place (see the module doc): the same
    function, to the weights' rounding. Returns the rotation (float64). Raises ``ValueError`` naming why for a
    model :func:`rotation_problem` refuses."""
    problem = rotation_problem(model)
    if problem:
        raise ValueError(f"UPQConfig(rotation='hadamard'): cannot rotate this model: {problem}")
    base, layers = _parts(model)
    hidden = base.embed_tokens.weight.shape[1]
    rotation = orthogonal(hidden, seed)

    def set_weight(module: nn.Module, value: torch.Tensor, name: str = "weight") -> None:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))

    def read(linears, norm) -> None:  # layers reading norm's output: the weight folded in, then turned
        scale = norm.weight.double()
        for linear in linears:
            set_weight(linear, (linear.weight.double() * scale[None, :]) @ rotation)
        norm.weight.fill_(1.0)

    head = model.get_output_embeddings()
    head_weight = head.weight.double().clone()
    set_weight(base.embed_tokens, base.embed_tokens.weight.double() @ rotation)
    for layer in layers:
        for norm_name, (part, names) in _READERS.items():
            module = getattr(layer, part)
            read([getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Linear)],
                 getattr(layer, norm_name))
        for part, name in _WRITERS:
            linear = getattr(getattr(layer, part), name)
            set_weight(linear, rotation.T @ linear.weight.double())
            if linear.bias is not None:
                set_weight(linear, linear.bias.double() @ rotation, "bias")
    # the head reads the final norm's output: untied from the embeddings (which turned on their own) if it was tied
    head.weight = nn.Parameter(((head_weight * base.norm.weight.double()[None, :]) @ rotation).to(head.weight.dtype),
                               requires_grad=head.weight.requires_grad)
    base.norm.weight.fill_(1.0)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return rotation
