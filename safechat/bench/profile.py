"""Where the cost of a check goes: one decode with and without the side [CLS], split in two.

    safechat bench profile [--model PATH] [--context 64 256] [--iters 200] [--threads N]

At a fixed cache length n (a prompt of n tokens), times llama_decode of
  A  [token]                   logits for the token            (a plain step)
  B  [token, CLS]              logits for both rows            (a checked step, as the runtime runs it)
  C  [token, CLS]              logits for the token only       (the [CLS] row's transformer work, no vocab projection)
and removes what each decode added, so every call sees the same cache. B - A is what a check
costs; C - A is the [CLS] row's pass through the layers; B - C is its vocabulary projection
(n_vocab x n_embd, of which the check reads two values). Medians of --iters calls.
"""
from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp as ll

from runtime.backends.llama import LlamaModelFile
from runtime.default_model import default_model_path


def _decode(ctx, batch, tokens, start, outputs):
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = int(outputs[i])
    batch.n_tokens = len(tokens)
    if ll.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


def profile(path, contexts, iters, threads):
    mf = LlamaModelFile(path)
    cls = mf.safety_meta().cls_token_id
    p = ll.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = 2048, 512, 512
    p.n_threads = p.n_threads_batch = threads
    p.no_perf = True
    ctx = ll.llama_init_from_model(mf.model, p)
    mem = ll.llama_get_memory(ctx)
    batch = ll.llama_batch_init(512, 0, 1)
    words = mf.tokenize(" the lighthouse keeper read the message again and again", False)
    rows = []
    cases = {"A": ([1], [True]), "B": ([1, cls], [True, True]), "C": ([1, cls], [True, False])}
    for n in contexts:
        prompt = (words * (n // len(words) + 1))[:n]
        ll.llama_memory_clear(mem, True)
        _decode(ctx, batch, prompt, 0, [False] * (n - 1) + [True])
        tok = words[0]
        times = {k: [] for k in cases}
        for _ in range(iters):
            for k, (toks, outs) in cases.items():  # interleaved
                toks = [tok if t == 1 else t for t in toks]
                t0 = time.perf_counter()
                _decode(ctx, batch, toks, n, outs)
                ll.llama_synchronize(ctx)
                times[k].append(time.perf_counter() - t0)
                ll.llama_memory_seq_rm(mem, 0, n, -1)
        rows.append((n, {k: statistics.median(v) for k, v in times.items()}))
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    return rows, mf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench profile", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    rows, mf = profile(a.model or default_model_path(), a.context, a.iters, a.threads)
    print(f"{mf.path.name}: n_vocab {mf.n_vocab}, {a.threads} threads, medians of {a.iters} decodes\n")
    print("| cache n | A plain step ms | B checked step ms | check cost (B-A)/A | [CLS] layers (C-A)/A "
          "| [CLS] vocab projection (B-C)/A |")
    print("|---|---|---|---|---|---|")
    for n, t in rows:
        A, B, C = t["A"], t["B"], t["C"]
        print(f"| {n} | {A * 1e3:.2f} | {B * 1e3:.2f} | {100 * (B - A) / A:+.0f}% | {100 * (C - A) / A:+.0f}% "
              f"| {100 * (B - C) / A:+.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
