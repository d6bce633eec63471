"""Plot fidelity against training budget for the INT2 recipes, from bench_upq.py's results.json.

    python examples/plot_budget.py out/bench-upq/results.json docs/budget.png      (needs matplotlib)
    python examples/plot_budget.py A/results.json B/results.json docs/budget.png   (runs merged, later ones win)

The title names the bits and mix of the first file's settings.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    *sources, target = sys.argv[1:]
    results = {}
    for source in sources:
        with open(source) as handle:
            results.update(json.load(handle))
    with open(sources[0]) as handle:
        settings = json.load(handle).get("settings", {})
    fig, (ax_top1, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"upq": ("tab:blue", "o"), "ntp": ("tab:red", "s"), "distill": ("tab:green", "^")}
    for recipe, (color, marker) in styles.items():
        curve = results.get(recipe, {}).get("curve") or []
        if not curve:
            continue
        tokens = [p["tokens"] / 1000 for p in curve]  # training tokens seen at that point (bench_upq.py)
        ax_top1.plot(tokens, [p["top1"] for p in curve], marker=marker, color=color, label=recipe)
        ax_kl.plot(tokens, [p["kl"] for p in curve], marker=marker, color=color, label=recipe)
    for key, label, style in (("int4_ptq", "INT4 PTQ", ":"), ("rtn", "INT2 RTN", "--"), ("ptq", "INT2 PTQ", "-.")):
        if key in results:
            ax_top1.axhline(results[key]["top1"], color="gray", linestyle=style, label=label)
            ax_kl.axhline(results[key]["kl"], color="gray", linestyle=style, label=label)
    ax_top1.set(xlabel="training tokens (thousands)", ylabel="top-1 agreement with the teacher",
                title="fidelity vs budget (higher is better)")
    ax_kl.set(xlabel="training tokens (thousands)", ylabel="KL(teacher || student), nats/token",
              title="KL vs budget (lower is better)", yscale="log")
    ax_top1.legend(fontsize=8)
    ax_kl.legend(fontsize=8)
    mix = settings.get("mix")
    fig.suptitle(f"SmolLM2-135M-Instruct, INT2 {'mix ' + mix if mix else 'g64'}, {results.get('split', 'report')} "
                 f"prompts: next-token QAT (ntp), Distill-QAT from RTN (distill) and UPQ")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
