"""Training tokens per second of `safechat train joint` by engine and number of processes (torchrun).

    safechat bench joint_speed --procs 1 2 --engine transformers llama --base B.gguf --data PREP.json.gz \
        [--steps 6] [--batch-tokens 2048] [--threads 2] [--max-train 64] [--device cpu|cuda]

Each row runs the real command, `safechat train joint` (one process) or `torchrun --nproc-per-node N -m
safechat train joint` (N > 1: gloo on the CPU, nccl on GPUs), on the same prepared data, the same training
sequences (generated once by the first row, then reused through --resume) and the same global batches;
`--threads` CPU threads in all, split over the processes. The rate is the card's history (rows = tokens
plus [CLS] positions of the global batch, no padding, per second of training) over steps 2.. (the first
step carries the allocation warm-up).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _command(n: int, out: Path, args, engine: str, resume: bool) -> list[str]:
    head = [sys.executable, "-m", "safechat"] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "safechat"]
    threads = max(1, args.threads // n) if args.device == "cpu" else args.threads
    return head + ["train", "joint", "--out", str(out), "--base", str(args.base), "--data", str(args.data),
                   "--engine", engine, "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
                   "--rank", str(args.rank), "--alpha", str(2 * args.rank), "--max-train", str(args.max_train),
                   "--gen-tokens", str(args.gen_tokens), "--device", args.device, "--threads", str(threads),
                   "--eval", "none", "--log-every", "1", "--ckpt-every", str(10 ** 6)] + (["--resume"] if resume else [])


def run(args) -> int:
    if not (args.base and args.data):
        raise SystemExit("error: --procs needs --base and --data (a base GGUF or folder, and `train joint-prep` data)")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, args.threads // max(args.procs)))}
    print(f"{args.steps} steps of at most {args.batch_tokens} tokens (global batch), LoRA r={args.rank}, "
          f"{args.threads} threads in all, device {args.device}, base {Path(args.base).name}")
    print("| engine | processes | threads each | tokens/s (steps 2..) | s/step |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        seqs = None
        for engine in args.engine:
            for n in args.procs:
                out = Path(tmp) / f"{engine}-{n}"
                out.mkdir()
                if seqs is not None:  # the first row's training sequences, so every row trains on the same ones
                    shutil.copy(seqs, out / seqs.name)
                    if (seqs.parent / "base.gguf").is_file():
                        shutil.copy(seqs.parent / "base.gguf", out / "base.gguf")
                r = subprocess.run(_command(n, out, args, engine, seqs is not None), env=env, capture_output=True,
                                   text=True, cwd=root)
                if r.returncode != 0:
                    print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"error: the {engine} run with {n} processes failed ({r.returncode})")
                seqs = seqs or out / "sequences.json.gz"
                hist = json.loads((out / "card.json").read_text())["training"]["history"]
                rate = float(np.mean([h["rows_per_s"] for h in hist[1:]]))
                secs = float(np.mean(np.diff([h["seconds"] for h in hist])))
                threads = max(1, args.threads // n) if args.device == "cpu" else args.threads
                print(f"| {engine} | {n} | {threads} | {rate:.0f} | {secs:.2f} |", flush=True)
    return 0
