"""The draft head's plots (matplotlib, written beside its model card): held-out accuracy per
draft step against training tokens, for one run (`heldout_curve.png`) and across the scaling
curve's runs (`scaling_curve.png`, with their chain-5 acceptance lengths)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step_accuracy(ax, tokens: list[float], heldout_accs: list[list[float]], title: str) -> None:
    """Held-out accuracy of each draft step against training tokens (millions)."""
    for k in range(len(heldout_accs[0])):
        ax.plot(tokens, [acc[k] for acc in heldout_accs], marker="o", label=f"step {k}")
    ax.set(xlabel="training tokens (M)", ylabel="held-out top-1 accuracy", title=title)
    ax.legend()


def plot_curve(points: list[dict], path: Path) -> None:
    plt = _pyplot()
    tokens = [p["train_tokens"] / 1e6 for p in points]
    fig, (acc, length) = plt.subplots(1, 2, figsize=(10, 4))
    plot_step_accuracy(acc, tokens, [p["heldout_acc"] for p in points], "per draft step (teacher-forced)")
    length.plot(tokens, [p["offline_acceptance_length"] for p in points], marker="o", label="offline estimate")
    if all("vllm_mtbench" in p for p in points):
        length.plot(tokens, [p["vllm_mtbench"]["acceptance_length"] for p in points], marker="s",
                    label="vLLM, MT-Bench")
    length.set(xlabel="training tokens (M)", ylabel="chain-5 acceptance length",
               title="acceptance length")
    length.legend()
    for ax in (acc, length):  # log-spaced data shares, ticked at the measured token counts
        ax.set_xscale("log")
        ax.set_xticks(tokens, [f"{t:.2g}" for t in tokens])
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
