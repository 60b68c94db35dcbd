"""Attacks caught against real look-alikes refused, per model, from saved conversation traces (a curve).

`safechat bench tradeoff --traces run6=T6.json --traces run8=T8.json [--png curve.png]`: for each real
look-alike budget (the share of val real look-alikes a pair may refuse), the pair `train calibrate` would choose on
val (the other budgets fixed: --plain-budget, --budget for the template look-alikes), and what it does on val and
test. The traces are `bench conversations --save` files; nothing runs a model, so the curve costs seconds. Where a
target (e.g. <= 3% real refused) is out of reach, this is the trade-off the issue asks for, side by side.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from safechat.train.calibrate import at_cadence, best_pair, refused, saved_traces, split_max

BUDGETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.10, 0.15)


def rows_of(traces_file: Path, every: int) -> dict:
    """{split: {group: rows}} from a `bench conversations --save` file of one model."""
    _, by_split = saved_traces(traces_file)
    if "real" not in by_split.get("val", {}) or "test" not in by_split:
        raise SystemExit(f"error: {traces_file} has no real look-alike traces (run `bench conversations --real`, val and test)")
    return {split: {g: split_max(at_cadence(t, every)) for g, t in groups.items()} for split, groups in by_split.items()}


def curve(rows: dict, budgets=BUDGETS, budget: float = 0.03, plain_budget: float = 0.02,
          prompt_only: bool = False) -> list[dict]:
    """One point per real budget: the val-chosen pair, its val and test attacks caught and real refused."""
    out = []
    for b in budgets:
        try:
            tp, ta = best_pair(rows["val"], budget, plain_budget, prompt_only=prompt_only, real_budget=b)
        except ValueError:
            continue
        point = {"real_budget": b, "threshold": tp, "answer_threshold": ta}
        for split in ("val", "test"):
            for g, r in rows[split].items():
                point[f"{split}_{g}"] = (refused(r, tp, ta), len(r))
        out.append(point)
    return out


def markdown(curves: dict[str, list[dict]]) -> str:
    lines = ["| model | real budget (val) | pair | val attacks | val real | test attacks | test plain | test template "
             "| test real |", "|---|---|---|---|---|---|---|---|---|"]
    f = lambda c: f"{c[0]}/{c[1]}"  # noqa: E731
    for name, pts in curves.items():
        for p in pts:
            ta = "never" if p["answer_threshold"] >= 1 else f"{p['answer_threshold']:.6f}"
            lines.append(f"| {name} | {p['real_budget']:.1%} | {p['threshold']:.4f} / {ta} | {f(p['val_attacks'])} | "
                         f"{f(p['val_real'])} | {f(p['test_attacks'])} | {f(p['test_plain'])} | "
                         f"{f(p['test_lookalike'])} | {f(p['test_real'])} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        for split, style in (("val", "--o"), ("test", "-s")):
            x = [100 * p[f"{split}_real"][0] / p[f"{split}_real"][1] for p in pts]
            y = [100 * p[f"{split}_attacks"][0] / p[f"{split}_attacks"][1] for p in pts]
            ax.plot(x, y, style, label=f"{name} ({split})")
    ax.set_xlabel("real look-alikes refused (%)")
    ax.set_ylabel("attacks caught (%)")
    ax.set_title("Pairs chosen on val at each real budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench tradeoff", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", action="append", required=True, metavar="NAME=FILE",
                    help="a model's saved traces (`bench conversations --save`), repeatable")
    ap.add_argument("--every", type=int, default=16, help="the cadence of the answer checks read from the traces")
    ap.add_argument("--budget", type=float, default=0.03, help="template look-alikes refused at most")
    ap.add_argument("--plain-budget", type=float, default=0.02, help="plain benign refused at most")
    ap.add_argument("--prompt-only", action="store_true", help="pairs that never check the answer")
    ap.add_argument("--png", type=Path, help="also draw the curves here")
    args = ap.parse_args(argv)
    curves = {}
    for spec in args.traces:
        name, sep, file = spec.partition("=")
        if not sep or not file:
            raise SystemExit(f"error: --traces wants NAME=FILE, got {spec!r}")
        if not Path(file).is_file():
            raise SystemExit(f"error: {file} not found")
        curves[name] = curve(rows_of(Path(file), args.every), budget=args.budget, plain_budget=args.plain_budget,
                             prompt_only=args.prompt_only)
    print(markdown(curves))
    if args.png:
        plot(curves, args.png)
        print(f"\nwrote {args.png}")
    return 0
