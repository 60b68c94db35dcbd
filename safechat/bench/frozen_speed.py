"""The `cls` recipe's frozen base, hand-written against transformers: prefill and [CLS] training speed.

    safechat bench frozen_speed [--base BASE.gguf] [--sequences 64] [--tokens 160] [--steps 5]

On the same random token sequences of one base: the frozen model's key/value prefill (tokens/s)
and training steps of the [CLS] row against those cached keys/values (forward + backward +
Adam, [CLS] queries/s), once through the hand-written model (safechat/convert/llama_torch.py or
gemma3_torch.py) and once through transformers (safechat/convert/hf_frozen.py), which is what every other
family runs on. Also printed: the largest difference between the two [CLS] hidden states (they are
one computation). The first step of each is left out (warm-up).
"""
from __future__ import annotations

import argparse
import time

from runtime.fetch import base_smollm2


def _time_steps(model, kv, lens, steps: int) -> float:
    import torch

    row = model.w["token_embd.weight"].mean(0).clone().requires_grad_(True)
    head = torch.zeros(2, row.shape[0], requires_grad=True)
    opt = torch.optim.Adam([row, head], lr=1e-3)
    y = torch.arange(len(lens)) % 2
    t0 = None
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model.cls_forward(row, kv, lens) @ head.T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench frozen_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="base GGUF of a llama or gemma3 model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=160, help="tokens per sequence")
    ap.add_argument("--queries", type=int, default=4, help="[CLS] positions per sequence")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from safechat.convert.reference import load_frozen

    torch.set_num_threads(args.threads)
    base = args.base or base_smollm2()
    rows = []
    for impl in ("auto", "transformers"):
        model = load_frozen(base, impl=impl)
        g = torch.Generator().manual_seed(0)  # the same sequences for both
        toks = torch.randint(100, model.cfg.n_vocab - 100, (args.sequences, args.tokens), generator=g)
        t0 = time.perf_counter()
        kv, _ = model.prefill(toks)
        prefill = time.perf_counter() - t0
        idx = torch.arange(args.sequences).repeat_interleave(args.queries)
        lens = torch.linspace(args.tokens // 4, args.tokens, args.queries).long().repeat(args.sequences)
        ctx = kv[:, :, idx].transpose(3, 4).contiguous().transpose(3, 4)  # KVCache.gather's layout
        with torch.no_grad():
            h = model.cls_forward(model.w["token_embd.weight"][77], ctx, lens)
        step = _time_steps(model, ctx, lens, args.steps)
        rows.append((type(model).__name__, args.sequences * args.tokens / prefill, len(lens) / step, h))
        del model, kv, ctx
    diff = float((rows[0][3] - rows[1][3]).abs().max())
    print(f"{base}: {args.sequences} sequences x {args.tokens} tokens, {args.queries} [CLS] each, "
          f"{args.threads} threads\n")
    print("| frozen model | prefill tokens/s | [CLS] training queries/s | vs hand-written |")
    print("|---|---|---|---|")
    for name, tps, qps, _ in rows:
        print(f"| {name} | {tps:,.0f} | {qps:,.0f} | {qps / rows[0][2]:.2f}x |")
    print(f"\nlargest difference between the two [CLS] hidden states: {diff:.2e}")
    return 0
