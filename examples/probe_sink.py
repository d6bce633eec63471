"""Where does a reconstruction go wrong? The token-relative error of a quantized model's residual stream against
the teacher's, per block and per token, over upq's calibration sequences (issue 36's block-12 blow-up).

The student is an INT2 reconstruction kept by ``examples/quantize_shared_ptq.py`` (a pickled model under
``/tmp/ptq-cache``); the teacher is the bundled model turned by the same rotation (``--seed``). Prints the mean
error of each block's output and the five sequences with the largest error at ``--block``, with the token where
it peaks, the error and the teacher's size there block by block (a student that builds the attention sink's
massive activation where the teacher has none shows an error in the thousands):

    python examples/probe_sink.py --seed 1 --state /tmp/ptq-cache/KEY.pt [--block 12]
"""
from __future__ import annotations

import argparse

import torch

from upq_hf.data import calibration_data
from upq_hf.models import load_model, load_tokenizer
from upq_hf.rotation import rotate_residual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (rotation and calibration order)")
    parser.add_argument("--state", required=True, help="a pickled INT2 reconstruction (quantize_shared_ptq.py)")
    parser.add_argument("--block", type=int, default=12, help="the block (1-based) whose sequences are ranked")
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    teacher = load_model(None).eval()
    tokenizer = load_tokenizer(teacher.config._name_or_path)
    rotate_residual(teacher, seed=args.seed)
    calibration = calibration_data("self", tokenizer, model=teacher, nsamples=args.samples, seqlen=128,
                                   seed=args.seed, n_prompts=331)
    student = torch.load(args.state, weights_only=False).eval()

    errors, sizes = [], []
    for start in range(0, len(calibration), 16):
        ids = calibration[start:start + 16]
        t = teacher(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[1:]
        s = student(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[1:]
        errors.append(torch.stack([(a - b).pow(2).mean(-1) / b.pow(2).mean(-1).clamp_min(1e-12) for a, b in zip(s, t)]))
        sizes.append(torch.stack([b.pow(2).mean(-1).sqrt() for b in t]))
    error, size = torch.cat(errors, 1), torch.cat(sizes, 1)  # (blocks, sequences, tokens)
    print("mean error per block:", " ".join(f"{float(x):.4f}" for x in error.mean((1, 2))))
    b = args.block - 1
    per_row = error[b].mean(-1)
    for row in per_row.argsort(descending=True)[:5].tolist():
        tok = int(error[b, row].argmax())
        text = tokenizer.decode(calibration[row, max(0, tok - 6):tok + 1])
        print(f"sequence {row}: block {args.block} error {float(per_row[row]):.3f}, peak at token {tok} "
              f"({float(error[b, row, tok]):.1f}x its size, teacher rms {float(size[b, row, tok]):.2f}): {text!r}")
        print("   error by block:", " ".join(f"{float(x):.2f}" for x in error[:, row, tok]))
        print("   teacher rms by block:", " ".join(f"{float(x):.1f}" for x in size[:, row, tok]))


if __name__ == "__main__":
    main()
