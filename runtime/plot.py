"""Draw the p_unsafe trace of a reply: the picture behind "why did it refuse?" (needs matplotlib)."""
from __future__ import annotations

from pathlib import Path

from .reply import Reply

COLORS = {"prompt": "tab:purple", "every": "tab:blue", "max_gap": "tab:cyan", "entropy": "tab:orange",
          "margin": "tab:olive", "sentence": "tab:green", "end": "tab:gray"}


def plot_trace(reply: Reply, out: str | Path, title: str = "") -> Path:
    """Write a PNG of p_unsafe per check (x: generated tokens covered), the threshold and the intervention."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    s = reply.safety
    if not s.trace:
        raise ValueError("this reply has no safety checks to plot (safety was off)")
    xs = [c for c, _ in s.trace]
    ys = [p for _, p in s.trace]
    triggers = s.triggers or ["check"] * len(xs)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(xs, ys, color="black", lw=1, zorder=1)
    if any(s.category_trace):  # a model with a category head: colour each check by its top harm category
        kinds = [c or "unknown" for c in s.category_trace]
        palette = plt.get_cmap("tab20")
        for i, kind in enumerate(dict.fromkeys(kinds)):
            pts = [(x, y) for x, y, k in zip(xs, ys, kinds) if k == kind]
            ax.scatter(*zip(*pts), s=28, color=palette(i % 20), label=f"category: {kind}", zorder=2)
    else:
        for kind in dict.fromkeys(triggers):
            pts = [(x, y) for x, y, t in zip(xs, ys, triggers) if t == kind]
            ax.scatter(*zip(*pts), s=28, color=COLORS.get(kind, "tab:red"), label=kind, zorder=2)
    if s.threshold is not None:
        ax.axhline(s.threshold, color="tab:red", ls="--", lw=1, label=f"threshold {s.threshold:.3f}")
    if s.answer_threshold is not None and s.answer_threshold != s.threshold and s.answer_threshold <= 1.0:
        ax.axhline(s.answer_threshold, color="tab:orange", ls=":", lw=1,
                   label=f"answer threshold {s.answer_threshold:.3f}")
    if s.intervened_at is not None:
        ax.axvline(s.intervened_at, color="tab:red", lw=2, alpha=0.4, label=f"intervened at {s.intervened_at}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("generated tokens covered by the check (0 = prompt)")
    ax.set_ylabel("p_unsafe")
    ax.set_title(title or (f"refused: {s.reason}" if reply.refused else "answered"), fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
