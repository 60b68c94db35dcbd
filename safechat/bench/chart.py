"""PNG charts of benchmark summaries (matplotlib, imported only when a chart is asked for)."""
from __future__ import annotations

GROUP_COLORS = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]


def overhead_chart(summary: list[dict], path, title: str = "") -> None:
    """Tokens/s and time to first token per configuration, one colour per loaded model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(s["group"] for s in summary))
    colors = [GROUP_COLORS[groups.index(s["group"]) % len(GROUP_COLORS)] for s in summary]
    names = [s["name"] for s in summary][::-1]
    colors = colors[::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.42 * len(summary) + 1.6), sharey=True)
    tps = [s["tok_s"] or 0.0 for s in summary][::-1]
    ax1.barh(names, tps, color=colors)
    for y, s in enumerate(summary[::-1]):
        if s["vs_plain"] is not None and s["group"] != "plain":
            ax1.text(tps[y], y, f" {s['vs_plain']:+.0%}", va="center", fontsize=8)
    plain = next((s["tok_s"] for s in summary if s["group"] == "plain"), None)
    if plain:
        ax1.axvline(plain, color="k", lw=0.8, ls="--")
    ax1.set_xlabel("tokens/s (median; label: time vs plain llama-cpp-python)")
    ax2.barh(names, [s["ttft_ms"] or 0.0 for s in summary][::-1], color=colors)
    ax2.set_xlabel("time to first streamed piece, ms (median)")
    fig.suptitle(title or "cost of safety")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
