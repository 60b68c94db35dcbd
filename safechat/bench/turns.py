"""Time to first token as a conversation grows, with and without the previous turn's cache kept.

    safechat bench turns [--model M.gguf] [--turns 10] [--max-tokens 32] [--report 1 5 10]

One scripted conversation (the same user turns, greedy answers) is played twice through
`runtime.load(...)`: once as the runtime does by default (the backend keeps the cache cells of
the prefix it shares with the previous turn, so a turn decodes only what is new) and once with
that reuse switched off (every turn re-decodes the whole history, as before). Both loops run it
(native and Python). Prints, per turn reported, the history length in tokens, the time to the
first shown piece in each mode, and the prompt tokens the backend decoded.
"""
from __future__ import annotations

import argparse
import time
import runtime

USER_TURNS = [
    "Hi! Can you help me plan a small vegetable garden?",
    "What vegetables are easiest for a beginner?",
    "How often should I water tomatoes?",
    "What about lettuce in summer?",
    "Can I grow herbs in the same bed?",
    "Which herbs go well with tomatoes?",
    "How do I keep snails away without chemicals?",
    "When should I harvest the first carrots?",
    "How do I store carrots for winter?",
    "Thanks! Can you summarise the plan in three lines?",
    "One more: what should I plant in autumn?",
    "And how do I prepare the soil for next spring?",
]


def play(model, turns: int, max_tokens: int) -> list[tuple[int, float, int]]:
    """(history tokens, seconds to the first shown piece, prompt tokens decoded) per turn."""
    history, rows = [], []
    for q in (USER_TURNS * (turns // len(USER_TURNS) + 1))[:turns]:
        history.append({"role": "user", "content": q})
        n = len(model.tokenize_messages(history))
        t = time.perf_counter()
        first = None
        with model.chat(history, max_tokens=max_tokens, temperature=0, stream=True) as g:
            for _ in g:
                if first is None:
                    first = time.perf_counter() - t
            reply = g.reply
        decoded = n - getattr(model.backend, "reused", 0)
        rows.append((n, first if first is not None else float("nan"), decoded))
        history.append({"role": "assistant", "content": reply.text})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench turns", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a safe GGUF (default: the default model)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--report", type=int, nargs="+", default=[1, 5, 10], help="turns to print")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    print(f"{args.turns} turns, greedy answers of at most {args.max_tokens} tokens, {args.threads} threads")
    print("| loop | turn | history tokens | first token, reuse (s) | decoded | first token, no reuse (s) | decoded |")
    print("|---|---|---|---|---|---|---|")
    for native in (True, False):
        got = {}
        for reuse in (True, False):
            m = runtime.load(args.model, threads=args.threads, native=native)
            m.backend.reuse_prefix = reuse
            got[reuse] = play(m, args.turns, args.max_tokens)
            m.close()
        for t in args.report:
            if 1 <= t <= args.turns:
                (n, a, da), (_, b, db) = got[True][t - 1], got[False][t - 1]
                print(f"| {'native' if native else 'python'} | {t} | {n} | {a:.3f} | {da} | {b:.3f} | {db} |",
                      flush=True)
    return 0
