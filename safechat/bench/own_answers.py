"""What prefix reuse buys and changes when generating the base model's own answers (train --own-answers).

    safechat bench own_answers [--n 150] [--tokens 32]

A seeded sample of the training prompts `train cls --own-answers --own-hardneg` answers, generated
greedily twice through the runtime's llama.cpp backend: a fresh pass per prompt (as the runtime
does) and in token order keeping the shared prefix's cache cells (as training does). Prints the
wall times, how many answers are identical, and where the others first diverge.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from runtime.fetch import base_smollm2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench own_answers")
    ap.add_argument("--n", type=int, default=150, help="prompts to answer")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from runtime.backends.llama import LlamaModelFile
    from safechat.train import data
    from safechat.train.cls_recipe import encode
    from safechat.train.own_answers import generate, pick

    base = base_smollm2()
    mf = LlamaModelFile(base)
    enc = [encode(e, mf, mf.chat_template, mf.bos if mf.add_bos else None)
           for e in data.build_dataset(seed=0) if e["split"] == "train"]
    mf.close()
    idx = pick(enc, 200, 200, seed=0, hardneg=True)
    prompts = [enc[i].tokens for i in random.Random(1).sample(idx, min(args.n, len(idx)))]
    out, secs = {}, {}
    for reuse in (False, True):
        t = time.perf_counter()
        out[reuse] = generate(base, prompts, args.tokens, args.threads, reuse=reuse)
        secs[reuse] = time.perf_counter() - t
    diverge = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
               for a, b in zip(out[False], out[True]) if a != b]
    print(f"\n{len(prompts)} prompts ({sum(map(len, prompts))} tokens), up to {args.tokens} greedy tokens each\n")
    print("| generation | seconds | answers identical to fresh | first divergence (median token, at token 0) |")
    print("|---|---|---|---|")
    print(f"| fresh pass per prompt | {secs[False]:.1f} | - | - |")
    med = f"{statistics.median(diverge):.0f}, {diverge.count(0)}" if diverge else "-"
    print(f"| token order, shared prefix kept | {secs[True]:.1f} | {len(prompts) - len(diverge)}/{len(prompts)} "
          f"| {med} |")
    return 0
