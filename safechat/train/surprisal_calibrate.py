"""`safechat train surprisal`: choose the prompt surprisal threshold on val, report it by kind (issue 35).

Every val prompt of `surprisal_data.surprisal_val` (benign by kind: everyday, code and maths, non-English,
base64/URL, look-alikes; attacks by kind: the random-suffix copies, plain, jailbreak-wrapped, prefilled)
goes through the model file's own prefill, as a chat's prompt check does (`Model.user_tokens`, then
`backend.start(..., check=True, score=...)`): one pass gives the [CLS] p_unsafe and the user-text
log-probabilities, hence the evidence (runtime/surprisal.py). Nothing is generated: the rule acts at the
prompt only.

The threshold is the lowest that flags at most `--budget` of *each* budgeted benign kind (`BUDGETED`; the
strictest kind decides), rounded up to 0.01 nats. The table gives, per kind, what the [CLS] check alone
refuses, what the surprisal rule alone flags, what the two together refuse (the rule is an OR), and
what the rule adds. `--write ARTIFACT` records the threshold and window in that artifact's card (then
`convert`, and stamp the file again); it refuses when the rule adds no catch on val.
"""
from __future__ import annotations

import json
import math
import random
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

from runtime.artifact import CARD, load_artifact
from runtime.backends.base import Sampling
from runtime.default_model import default_model_path
from runtime.model import load
from runtime.surprisal import DEFAULT_WINDOW, evidence

from .surprisal_data import BUDGETED, surprisal_val


def score(model, items: list[dict], window: int, log=print, keep=None) -> list[dict]:
    """Each item with p_unsafe (the [CLS] at the prompt) and surprisal (the evidence), by the file's own path.
    `keep(rows so far)` is called every 25 prompts (a long run killed midway keeps what it scored)."""
    be, out, t0 = model.backend, [], time.time()
    order = sorted(range(len(items)), key=lambda i: (items[i]["kind"], items[i]["prompt"]))  # shared prefixes
    for n, i in enumerate(order):
        e = items[i]
        msgs = [{"role": "user", "content": e["prompt"]}] + (
            [{"role": "assistant", "content": e["prefill"]}] if e.get("prefill") else [])
        tokens, users = model.user_tokens(msgs)
        if users is None:
            raise RuntimeError(f"the user text of a {e['kind']} prompt cannot be located: {e['prompt'][:60]!r}")
        tokens = tokens[:be.n_ctx - 8]  # a prompt past the context is cut (the chat would refuse it anyway)
        users = [u for u in users if u < len(tokens)]
        p = be.start(tokens, Sampling(), check=True, score=users)
        out.append({**e, "p_unsafe": float(p), "surprisal": evidence(be.prompt_logprobs(), window),
                    "n_user_tokens": len(users)})
        if log and (n + 1) % 200 == 0:
            log(f"  {n + 1}/{len(items)} prompts scored ({time.time() - t0:.0f}s)")
        if keep and (n + 1) % 25 == 0:
            keep(out)
    return out


def choose_threshold(rows: list[dict], budget: float, kinds=BUDGETED) -> tuple[float, str]:
    """The lowest threshold (nats, rounded up to 0.01) flagging at most `budget` of each benign kind; and the
    kind that decided it."""
    best, decided = 0.0, ""
    for kind in kinds:
        vals = sorted((r["surprisal"] for r in rows if r["kind"] == kind), reverse=True)
        if not vals:
            continue
        allowed = int(math.floor(budget * len(vals) + 1e-9))
        t = vals[allowed] if allowed < len(vals) else 0.0
        if t >= best:
            best, decided = t, kind
    return math.floor(best * 100 + 1) / 100, decided  # strictly above the highest value it must let through


def table(rows: list[dict], cls_thr: float, s_thr: float) -> str:
    """Per kind: n, [CLS] alone, surprisal alone, both (OR), added by surprisal; evidence median / 95th pct."""
    by = defaultdict(list)
    for r in rows:
        by[(r["label"], r["kind"])].append(r)
    lines = ["| kind | n | [CLS] alone | surprisal alone | [CLS] or surprisal | added by surprisal | "
             "surprisal median / p95 / max (nats) |", "|---|---|---|---|---|---|---|"]
    for (label, kind), rs in sorted(by.items(), key=lambda x: (x[0][0], x[0][1] not in BUDGETED, x[0][1])):
        n = len(rs)
        c = sum(r["p_unsafe"] >= cls_thr for r in rs)
        s = sum(r["surprisal"] >= s_thr for r in rs)
        both = sum(r["p_unsafe"] >= cls_thr or r["surprisal"] >= s_thr for r in rs)
        v = sorted(r["surprisal"] for r in rs)
        pct = lambda k: f"{k}/{n} ({100 * k / n:.1f}%)"  # noqa: E731
        name = ("benign " if label == 0 else "") + kind + ("" if label or kind in BUDGETED else " (not budgeted)")
        lines.append(f"| {name} | {n} | {pct(c)} | {pct(s)} | {pct(both)} | {both - c:+d} | "
                     f"{v[n // 2]:.2f} / {v[min(n - 1, int(0.95 * n))]:.2f} / {v[-1]:.2f} |")
    return "\n".join(lines)


def distinct(rows: list[dict]) -> list[dict]:
    """One row per prompt (kind, text, prefill): a prompt scored by two runs (a sample, then its whole kind)
    counts once, with the later run's score."""
    return list({(r["kind"], r["prompt"], r.get("prefill")): r for r in rows}.values())


def _run(args) -> int:
    t0 = time.time()
    path = args.model
    if path is None:
        path = default_model_path()
    if args.window < 1:
        raise SystemExit("--window must be >= 1")
    rows, cls_thr, scored_by = [], None, None
    for f in args.scores:  # kinds scored by earlier runs (their --save), merged
        saved = json.loads(Path(f).read_text())
        if saved["window"] != args.window or (cls_thr is not None and saved["cls_threshold"] != cls_thr):
            raise SystemExit(f"{f} was scored with window {saved['window']} and [CLS] threshold "
                             f"{saved['cls_threshold']}; this run uses window {args.window}")
        if Path(saved["model"]).name != Path(scored_by or saved["model"]).name:
            raise SystemExit(f"{f} was scored with {saved['model']}, an earlier --scores file with {scored_by}")
        rows += saved["rows"]
        cls_thr, scored_by = saved["cls_threshold"], saved["model"]
    if scored_by is not None and args.model is not None and Path(args.model).name != Path(scored_by).name:
        raise SystemExit(f"the --scores files were scored with {scored_by}, not --model {args.model}")
    kinds = set(args.kinds.split(",")) if args.kinds else None
    items = [] if args.scores and kinds is None else surprisal_val(seed=args.seed, split=args.split)
    items = [e for e in items if kinds is None or e["kind"] in kinds]
    if args.limit:  # a seeded sample of at most `limit` prompts per kind
        by = defaultdict(list)
        for e in items:
            by[e["kind"]].append(e)
        rng = random.Random(args.seed)
        items = [e for k in sorted(by) for e in (by[k] if len(by[k]) <= args.limit else rng.sample(by[k], args.limit))]
    if items:
        print(f"{len(items)} {args.split} prompts; scoring with {Path(path).name} (window {args.window})")
        def keep(scored):
            if args.save:
                args.save.write_text(json.dumps({"window": args.window, "cls_threshold": m.meta.threshold,
                                                 "model": str(path), "split": args.split, "rows": scored}) + "\n")
        with load(path, n_ctx=args.n_ctx, threads=args.threads) as m:
            if cls_thr is not None and m.meta.threshold != cls_thr:
                raise SystemExit("the saved scores come from a file with another [CLS] threshold")
            scored = score(m, items, args.window, keep=keep)
            keep(scored)
            cls_thr = m.meta.threshold
        rows += scored
    rows = distinct(rows)
    thr, decided = choose_threshold(rows, args.budget)
    attacks = [r for r in rows if r["label"] == 1]
    added = sum(r["surprisal"] >= thr and r["p_unsafe"] < cls_thr for r in attacks)
    print(f"\nsurprisal threshold {thr:.2f} nats (window {args.window}): at most {100 * args.budget:g}% of each "
          f"benign kind flagged (decided by {decided}); [CLS] prompt threshold {cls_thr:.4f}\n")
    print(table(rows, cls_thr, thr))
    print(f"\nattacks caught at the prompt: [CLS] {sum(r['p_unsafe'] >= cls_thr for r in attacks)}/{len(attacks)}, "
          f"with the surprisal rule {sum(r['p_unsafe'] >= cls_thr or r['surprisal'] >= thr for r in attacks)}"
          f"/{len(attacks)} ({added:+d}); {time.time() - t0:.0f}s")
    if args.write:
        if added <= 0:
            print(f"not written to {args.write}: the rule adds no catch on {args.split}", file=sys.stderr)
            return 1
        art = load_artifact(args.write)
        art.card.update(surprisal_threshold=thr, surprisal_window=args.window)
        art.card["surprisal_calibration"] = {
            "command": "safechat train " + " ".join(shlex.quote(a) for a in args.argv),
            "budget_per_benign_kind": args.budget, "decided_by": decided, "split": args.split,
            "added_catches": added, "attacks": len(attacks), "model": Path(path).name}
        (Path(args.write) / CARD).write_text(json.dumps(art.card, indent=2, sort_keys=True) + "\n")
        print(f"wrote surprisal_threshold={thr} surprisal_window={args.window} into {args.write / CARD}")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("surprisal", help="choose the prompt surprisal threshold on val prompts by kind; "
                                         "print the table (issue 35)")
    c.add_argument("--model", type=Path, default=None, help="the GGUF to measure (default: the embedded default)")
    c.add_argument("--budget", type=float, default=0.01,
                   help="at most this share of each benign kind flagged by the rule (default 1%%)")
    c.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per window (default 8)")
    c.add_argument("--split", default="val", choices=("val", "test"))
    c.add_argument("--seed", type=int, default=0, help="the data set's seed (the default artifact's is 0)")
    c.add_argument("--limit", type=int, default=0, help="at most this many prompts per kind (a seeded sample)")
    c.add_argument("--n-ctx", type=int, default=2048)
    c.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: measured fastest beside a busy job)")
    c.add_argument("--save", type=Path, default=None, help="write the prompts scored by this run, with their scores, "
                   "as JSON (before the table: a long measurement can be split into runs by --kinds)")
    c.add_argument("--scores", action="append", default=[], metavar="JSON",
                   help="merge prompts scored by an earlier run's --save (repeatable); with no --kinds nothing "
                        "new is scored")
    c.add_argument("--kinds", default=None, help="score only these kinds (comma-separated; see surprisal_data.py)")
    c.add_argument("--write", type=Path, default=None, metavar="ARTIFACT",
                   help="record the threshold and window in this artifact's card (only if the rule adds catches)")
    c.set_defaults(fn=_run)
