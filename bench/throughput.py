"""Tokens/s of the runtime with checks off / every step / every k, against plain llama-cpp-python.

    python -m bench throughput [--model PATH] [--tokens 128] [--repeats 3] [--every 1 2 4 8]

Greedy, one fixed benign prompt, fixed length (the model runs until max_tokens; EOG is not
sampled because the runs ask for a long text and the length is checked). Configurations are
run interleaved, `--repeats` times each; the table shows the median. Speed only: the safety
threshold is set to 0.999999 so that no intervention shortens a run (a check costs the same
whatever its verdict).
"""
from __future__ import annotations

import argparse
import statistics
import time

from runtime.model import load
from runtime.strategy import SafetyPolicy

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def _runtime_run(model, policy, n):
    r = model.chat(PROMPT, max_tokens=n, safety=policy if policy else "off")
    return r.usage.completion_tokens, r.usage.seconds, r.safety.checks


def _plain_run(llm, n):
    t0 = time.perf_counter()
    out = llm.create_chat_completion([{"role": "user", "content": PROMPT}], max_tokens=n, temperature=0.0,
                                     repeat_penalty=1.0, top_k=1)
    return out["usage"]["completion_tokens"], time.perf_counter() - t0, 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench throughput")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    model = load(args.model, threads=args.threads)
    from llama_cpp import Llama
    llm = Llama(str(model.path), n_ctx=4096, n_threads=model.backend_threads, verbose=False)
    configs = [("llama-cpp-python Llama (no safety)", lambda: _plain_run(llm, args.tokens)),
               ("runtime, checks off", lambda: _runtime_run(model, None, args.tokens))]
    for k in args.every:
        configs.append((f"runtime, check every {k}", lambda k=k: _runtime_run(
            model, SafetyPolicy(every=k, threshold=0.999999), args.tokens)))
    for _, fn in configs:  # warm-up
        fn()
    results = {name: [] for name, _ in configs}
    for _ in range(args.repeats):
        for name, fn in configs:
            results[name].append(fn())
    base = statistics.median(n / s for n, s, _ in results["runtime, checks off"])
    print(f"\nmodel: {model.path.name}  tokens: {args.tokens}  repeats: {args.repeats} (median)  "
          f"threads: {model.backend_threads}\n")
    print("| configuration | tokens | checks | tok/s | time vs checks off |")
    print("|---|---|---|---|---|")
    for name, _ in configs:
        runs = results[name]
        tps = statistics.median(n / s for n, s, _ in runs)
        n = statistics.median(n for n, _, _ in runs)
        checks = statistics.median(c for _, _, c in runs)
        print(f"| {name} | {n:.0f} | {checks:.0f} | {tps:.1f} | {base / tps - 1:+.0%} |")
    return 0
