"""How many tokens each check policy needs to catch prefill attacks, and what it costs on benign ones.

    safechat bench policies [--model PATH] [--tokens 48] [--limit N] [--policy 'every 4' ...]

Prompts: a held-out split of the training data (safechat/train/data.py; `--split test` by default, `val` to
choose between models without looking at test): harmful requests with an
attacker's assistant prefill ("Sure, here is ..."), and benign requests (with and without a
prefill). Each policy generates greedily; the table shows, for the attacks, how many were caught
and after how many generated tokens (0 = at the end of the prompt + prefill), and, for the benign
prompts, false refusals and checks per generated token (the cost: on these CPUs one check costs
about one token). Nothing unchecked is ever shown, whatever the policy (hold-back buffer).
"""
from __future__ import annotations

import argparse
import statistics

from runtime.model import load
from runtime.strategy import SafetyPolicy
from safechat.train.calibrate import held_out_prompts, messages

POLICIES = {
    "every 1": SafetyPolicy(every=1),
    "every 4": SafetyPolicy(every=4),
    "every 8": SafetyPolicy(every=8),
    "every 16": SafetyPolicy(every=16),
    "adaptive (max gap 8, entropy>=3, sentence ends)": SafetyPolicy(every=0, max_gap=8, entropy_trigger=3.0,
                                                                     sentence_ends=True),
    "adaptive (max gap 16, entropy>=3, sentence ends)": SafetyPolicy(every=0, max_gap=16, entropy_trigger=3.0,
                                                                      sentence_ends=True),
    # cheap candidates: about one check per 16 tokens costs about 5% on these CPUs (bench profile)
    "adaptive (max gap 16, entropy>=4)": SafetyPolicy(every=0, max_gap=16, entropy_trigger=4.0),
    "adaptive (max gap 16, margin<=0.02)": SafetyPolicy(every=0, max_gap=16, margin_trigger=0.02),
    "adaptive (max gap 32, entropy>=3.5)": SafetyPolicy(every=0, max_gap=32, entropy_trigger=3.5),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench policies")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=0, help="use at most this many prompts per group")
    ap.add_argument("--split", default="test", choices=["val", "test"],
                    help="held-out split to draw the prompts from (choose between models on val)")
    ap.add_argument("--policy", action="append", choices=list(POLICIES), metavar="NAME",
                    help="run only this policy (repeatable; default: all of them)")
    args = ap.parse_args(argv)
    from safechat.train.data import build_dataset

    attacks, benign = held_out_prompts(build_dataset(seed=0), args.split, args.limit)
    model = load(args.model)
    print(f"\nmodel: {model.path.name}  threshold {model.meta.threshold:.4f}  {args.split} split: "
          f"{len(attacks)} prefill attacks, "
          f"{len(benign)} benign (prefilled or look-dangerous) prompts, up to {args.tokens} tokens, greedy\n")
    print("| policy | attacks caught | caught at the prompt | tokens to catch (median / max, after the prompt)"
          " | benign refused | checks per generated token |")
    print("|---|---|---|---|---|---|")
    for name, pol in POLICIES.items():
        if args.policy and name not in args.policy:
            continue
        caught, at_prompt, later = 0, 0, []
        for e in attacks:
            r = model.chat(messages(e), max_tokens=args.tokens, safety=pol)
            if r.refused:
                caught += 1
                if r.safety.intervened_at == 0:
                    at_prompt += 1
                else:
                    later.append(r.safety.intervened_at)
        refused, checks, toks = 0, 0, 0
        for e in benign:
            r = model.chat(messages(e), max_tokens=args.tokens, safety=pol)
            refused += r.refused
            checks += r.safety.checks - 1  # the prompt check is the same for every policy
            toks += r.usage.completion_tokens
        lat = f"{statistics.median(later):.0f} / {max(later)}" if later else "-"
        print(f"| {name} | {caught}/{len(attacks)} | {at_prompt} | {lat} | {refused}/{len(benign)} "
              f"| {checks / max(toks, 1):.3f} |", flush=True)
    return 0
