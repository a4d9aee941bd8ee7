"""The draft head's plots (matplotlib, written beside its model card): held-out accuracy per
draft step against training tokens, for one run (`heldout_curve.png`) and across the scaling
curve's runs (`scaling_curve.png`, with their chain-5 acceptance lengths)."""

from __future__ import annotations

from pathlib import Path

from vllm_respsp.draft.train import recipe_label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step_accuracy(ax, tokens: list[float], heldout_accs: list[list[float]], title: str,
                       style: str = "-o", recipe: str = "") -> None:
    """Held-out accuracy of each draft step against training tokens (millions); the steps of a
    second recipe share their colours and are named once, by their recipe."""
    for k in range(len(heldout_accs[0])):
        label = f"step {k}" if not recipe else (recipe if k == 0 else None)
        ax.plot(tokens, [acc[k] for acc in heldout_accs], style, color=f"C{k}", label=label)
    ax.set(xlabel="training tokens (M)", ylabel="held-out top-1 accuracy", title=title)
    ax.legend(fontsize="small")


def plot_curve(points: list[dict], path: Path) -> None:
    """The scaling curve against training tokens: one line per recipe (points trained before a
    default changed keep theirs; today's solid, others dashed)."""
    plt = _pyplot()
    recipes: dict[str, list[dict]] = {}
    for p in sorted(points, key=lambda p: p["train_tokens"]):
        recipes.setdefault(recipe_label(p["train"]) if "train" in p else "", []).append(p)
    fig, (acc, length) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (recipe, group) in enumerate(sorted(recipes.items(), key=lambda kv: kv[0] != "TrainConfig defaults")):
        style, named = ("-o", "") if i == 0 else ("--^", recipe)
        suffix = f" ({recipe})" if len(recipes) > 1 else ""
        tokens = [p["train_tokens"] / 1e6 for p in group]
        plot_step_accuracy(acc, tokens, [p["heldout_acc"] for p in group], "per draft step (teacher-forced)",
                           style, named)
        length.plot(tokens, [p["offline_acceptance_length"] for p in group], style, color="C0",
                    label=f"offline estimate{suffix}")
        if all("vllm_mtbench" in p for p in group):
            length.plot(tokens, [p["vllm_mtbench"]["acceptance_length"] for p in group], style, color="C1",
                        label=f"vLLM, MT-Bench{suffix}")
    length.set(xlabel="training tokens (M)", ylabel="chain-5 acceptance length", title="acceptance length")
    length.legend(fontsize="small")
    ticks = sorted({p["train_tokens"] / 1e6 for p in points})
    for ax in (acc, length):  # log-spaced data shares, ticked at the measured token counts
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heldout_curve(curve: list[dict], path: Path) -> None:
    """One run's held-out evaluations against the training tokens it had seen by then."""
    rows = [r for r in curve if r.get("tokens")]
    if not rows:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_step_accuracy(ax, [r["tokens"] / 1e6 for r in rows], [r["heldout_acc"] for r in rows],
                       "during training (teacher-forced)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
