"""Soak: many short turns across many conversations through one loaded model; memory must stay flat.

    safechat bench soak [--turns 10000] [--conversations 50] [--model PATH]

Without --model it runs the default model (short answers: at most 8 tokens per turn). Resident memory (RSS, from
/proc/self/statm) is sampled every `--every` turns; the table reports the least-squares slope
per 1,000 turns after a warm-up, and the largest KV-cache position seen (it must stay bounded by
the longest conversation, never grow with the number of turns).
"""
from __future__ import annotations

import argparse
import random
import time

import llama_cpp as ll
import numpy as np

from runtime.model import load

from .common import rss_mb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench soak")
    ap.add_argument("--turns", type=int, default=10_000)
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--max-turns-per-conversation", type=int, default=8)
    ap.add_argument("--every", type=int, default=500, help="sample memory every N turns")
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    model = load(args.model, n_ctx=1024, threads=1, safety={"every": 2})  # default: the default model
    rng = random.Random(0)
    convs: list[list[dict]] = [[] for _ in range(args.conversations)]
    samples, max_pos, refused = [], 0, 0
    t0 = time.time()
    for turn in range(1, args.turns + 1):
        c = rng.randrange(len(convs))
        if len(convs[c]) >= 2 * args.max_turns_per_conversation:
            convs[c] = []
        convs[c].append({"role": "user", "content": f"turn {turn}: " + "word " * rng.randint(1, 12)})
        r = model.chat(convs[c], max_tokens=rng.randint(1, 8), temperature=0.7, seed=turn,
                       stream=bool(turn % 2))
        if not hasattr(r, "text"):  # a stream: drain it
            r = r.run()
        refused += r.refused
        convs[c].append({"role": "assistant", "content": r.text})
        max_pos = max(max_pos, ll.llama_memory_seq_pos_max(model.backend.mem, 0))
        if turn % args.every == 0:
            samples.append((turn, rss_mb()))
    wall = time.time() - t0
    warm = [(t, m) for t, m in samples if t > args.turns // 10] or samples
    x, y = np.array([t for t, _ in warm], float), np.array([m for _, m in warm])
    slope = float(np.polyfit(x, y, 1)[0] * 1000) if len(warm) > 1 else 0.0
    print(f"\nsoak: {args.turns} turns over {args.conversations} conversations in {wall:.0f} s "
          f"({args.turns / wall:.0f} turns/s), model {model.path.name}\n")
    print("| turns | RSS MB |")
    print("|---|---|")
    for t, m in samples[:: max(1, len(samples) // 10)] + [samples[-1]]:
        print(f"| {t} | {m:.1f} |")
    print(f"\nRSS slope after warm-up: {slope:+.3f} MB per 1,000 turns; RSS {samples[0][1]:.1f} -> "
          f"{samples[-1][1]:.1f} MB; largest KV position {max_pos} (context {model.backend.n_ctx}); "
          f"refused turns {refused}")
    return 0
