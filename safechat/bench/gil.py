"""Does generation in one thread stop another Python thread? A counter measures it.

    safechat bench gil [--model PATH] [--tokens 128] [--threads 1]

A pure-Python counter runs in the main thread for the whole time another thread generates
(checks every 4th step). Its rate is compared with its rate alone: 100% means generation never
held the GIL the counter wanted. Rows: the native loop (cpp_ext/loop.c, GIL released for the
whole token loop) and the pure-Python loop (GIL released only inside each llama.cpp call).
llama.cpp gets `--threads` (default 1) so that a core is left for the counter.
"""
from __future__ import annotations

import argparse
import threading
import time

from runtime.model import load
from runtime.strategy import SafetyPolicy

from .common import PROMPT, SPEED_THRESHOLD


def _count_while(busy: threading.Event) -> tuple[int, float]:
    """Increment a counter until `busy` clears; (count, elapsed)."""
    n, t0 = 0, time.perf_counter()
    while busy.is_set():
        n += 1
    return n, time.perf_counter() - t0


def _rate_alone(seconds: float) -> float:
    busy = threading.Event()
    busy.set()
    timer = threading.Timer(seconds, busy.clear)
    timer.start()
    n, dt = _count_while(busy)
    timer.join()
    return n / dt


def _rate_during(model, tokens: int) -> tuple[float, float]:
    busy = threading.Event()
    busy.set()
    out = {}

    def work():
        try:
            out["reply"] = model.chat(PROMPT, max_tokens=tokens, safety=SafetyPolicy(threshold=SPEED_THRESHOLD))
        finally:
            busy.clear()

    t = threading.Thread(target=work)
    t.start()
    n, dt = _count_while(busy)
    t.join()
    r = out["reply"]
    return n / dt, r.usage.completion_tokens / r.usage.seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="safechat bench gil", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a safe GGUF (default: the embedded default model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (leave a core for the counter)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    models = {"native loop": load(a.model, threads=a.threads, native=True),
              "Python loop": load(a.model, threads=a.threads, native=False)}
    for m in models.values():  # warm up
        m.chat(PROMPT, max_tokens=8)
    alone = max(_rate_alone(1.0) for _ in range(a.repeats))
    rows = {name: [] for name in models}
    for _ in range(a.repeats):
        for name, m in models.items():
            rows[name].append(_rate_during(m, a.tokens))
    print(f"Counter alone: {alone / 1e6:.2f} M increments/s (best of {a.repeats} 1-s runs)\n")
    print("| generation in another thread | counter rate during it | of alone | tokens/s |")
    print("|---|---|---|---|")
    for name, runs in rows.items():
        rate = sorted(r for r, _ in runs)[len(runs) // 2]
        tps = sorted(t for _, t in runs)[len(runs) // 2]
        print(f"| {name} | {rate / 1e6:.2f} M/s | {100 * rate / alone:.0f}% | {tps:.1f} |")


if __name__ == "__main__":
    main()
