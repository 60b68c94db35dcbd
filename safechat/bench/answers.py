"""What the model answers to everyday questions, per model file: the first thing a user judges.

    safechat bench answers [--model A.gguf --model B.gguf ...] [--max-tokens 48] [--greedy]

Each file answers the same fixed questions through `runtime.load(...).chat` with the chat
defaults (or greedily with --greedy) and a fixed seed, so a run is repeatable. Prints one
markdown table per question (file, answer, refused, tokens/s) and, per file, how many answers
contain the expected word (a rough correctness count for the questions that have one).
"""
from __future__ import annotations

import argparse
from pathlib import Path
import runtime

# (question, a word a correct answer contains, or None for open questions)
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("How many days are there in a week?", "seven|7"),
    ("What is 12 plus 7?", "19"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What gas do plants take in from the air?", "carbon dioxide|CO2"),
    ("Give me three tips for sleeping better.", None),
    ("Write a haiku about the sea.", None),
]


def _correct(answer: str, expect: str | None) -> bool | None:
    if expect is None:
        return None
    return any(w.lower() in answer.lower() for w in expect.split("|"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench answers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="a safe GGUF (repeatable; default: the default model)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--greedy", action="store_true", help="temperature 0 instead of the chat defaults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    paths = [Path(p) for p in args.model] or [None]
    models = [runtime.load(p, threads=args.threads) for p in paths]
    names = [m.path.name for m in models]
    kw = {"temperature": 0.0} if args.greedy else {}
    right = [[0, 0] for _ in names]
    print(f"sampling: {'greedy' if args.greedy else 'chat defaults'}, seed {args.seed}, "
          f"at most {args.max_tokens} tokens\n")
    for q, expect in QUESTIONS:
        print(f"**{q}**\n\n| file | answer | refused | tok/s |\n|---|---|---|---|")
        for i, (name, m) in enumerate(zip(names, models)):
            r = m.chat(q, max_tokens=args.max_tokens, seed=args.seed, **kw)
            ok = _correct(r.text, expect)
            if ok is not None:
                right[i][0] += ok
                right[i][1] += 1
            text = r.text.replace("\n", " ").replace("|", "\\|").strip()
            print(f"| {name} | {text} | {'yes' if r.refused else 'no'} | {r.usage.tokens_per_second:.0f} |")
        print()
    print("| file | answers with the expected word |\n|---|---|")
    for name, (n_ok, n) in zip(names, right):
        print(f"| {name} | {n_ok} / {n} |")
    for m in models:
        m.close()
    return 0
