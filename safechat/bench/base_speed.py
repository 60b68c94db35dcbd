"""How fast a base model runs here: the speed half of the issue's "second base" trade-off.

    safechat bench base_speed [--base GGUF ...] [--prompts 40] [--new 64] [--threads 2]

For the default base (SmolLM2-135M-Instruct, Q4_1) and each `--base` file: parameters (all, the token
embeddings, the rest: the body a [CLS] reads; and the embeddings' spread as stored), file size,
tokens per prompt (the first --prompts validation prompts of the training data, each in the base's
chat format: its own template, or Gemma's turn format for a file without one), prompt processing
(tokens/s over those prompts, each from an empty cache) and generation (tokens/s, greedy, --new
tokens after each prompt, end-of-generation ignored so every run has the same length). Everything
goes through the runtime's llama.cpp backend with checks off: a plain decode, what the model costs
before any [CLS] check (a check is one more position in a decode). Medians over prompts; one table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from runtime.backends.base import Sampling
from runtime.fetch import base_smollm2
from runtime.prompt import build_prompt, prompt_template, prompt_tokens

from .common import MB, markdown_table


def _params(path: Path) -> tuple[str, int, int, float]:
    """(architecture, parameters, of which the token embeddings, std of the embeddings as stored)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    std = float(np.asarray(gguf.quants.dequantize(emb.data, emb.tensor_type), dtype=np.float32).std())
    return arch, int(sum(int(np.prod(t.shape)) for t in r.tensors)), int(np.prod(emb.shape)), std


def measure(path: Path, prompts: list[dict], n_new: int, threads: int) -> dict:
    from runtime.backends.llama import LlamaBackend, LlamaModelFile

    arch, n_params, n_embd_params, embd_std = _params(path)
    mf = LlamaModelFile(path)
    template = prompt_template(mf)
    bos = mf.bos if mf.add_bos else None
    toks = [prompt_tokens(build_prompt(template, [{"role": "user", "content": p["prompt"]}]), mf, bos)
            for p in prompts]
    be = LlamaBackend(mf, n_ctx=max(map(len, toks)) + n_new + 8, threads=threads)
    pp, tg = [], []
    try:
        for t in toks:
            t0 = time.perf_counter()
            be.start(t, Sampling(), check=False)
            t1 = time.perf_counter()
            tok = be.sample()
            for _ in range(n_new - 1):
                be.advance(tok, check=False)
                tok = be.sample()
            t2 = time.perf_counter()
            pp.append(len(t) / (t1 - t0))
            tg.append((n_new - 1) / (t2 - t1))
    finally:
        be.close()
        mf.close()
    return {"name": path.name, "arch": arch, "params_m": n_params / 1e6, "embedding_m": n_embd_params / 1e6,
            "embedding_std": embd_std, "file_mb": path.stat().st_size / MB,
            "tokens_per_prompt": statistics.median(map(len, toks)), "prompt_tok_s": statistics.median(pp),
            "gen_tok_s": statistics.median(tg)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench base_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, nargs="*", default=[], help="other base GGUF files to compare")
    ap.add_argument("--prompts", type=int, default=40, help="validation prompts to time")
    ap.add_argument("--new", type=int, default=64, help="tokens generated after each prompt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from safechat.train.data import build_dataset

    prompts = [e for e in build_dataset(seed=0) if e["split"] == "val"][:args.prompts]
    rows = []
    for path in [base_smollm2(), *args.base]:
        r = measure(Path(path), prompts, args.new, args.threads)
        rows.append([r["name"], r["arch"], f"{r['params_m']:.0f}", f"{r['embedding_m']:.0f}",
                     f"{r['params_m'] - r['embedding_m']:.0f}", f"{r['embedding_std']:.3f}", f"{r['file_mb']:.0f}",
                     f"{r['tokens_per_prompt']:.0f}", f"{r['prompt_tok_s']:.0f}", f"{r['gen_tok_s']:.1f}"])
    print(markdown_table(["base", "architecture", "parameters (M)", "token embeddings (M)", "the rest (M)",
                          "embedding std (as stored)", "file (MiB)", "tokens per prompt (median)",
                          "prompt processing (tok/s)", "generation (tok/s)"], rows))
    print(f"\n{len(prompts)} validation prompts, {args.new} greedy tokens after each, {args.threads} threads, "
          "llama.cpp through the runtime's backend with checks off; medians over prompts")
    return 0
