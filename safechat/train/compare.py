"""`safechat train compare OLD NEW`: two artifacts on the held-out examples neither trained on.

When the data set grows between two artifacts (dataset v1 -> v2 added hard-negative templates),
whole groups can move between splits, so each card's own val/test figures are measured on
different examples, and an example in one artifact's test split may be in the other's training
split. This command rebuilds both data sets (`--old-hardneg-templates N`: OLD was trained with the
first N templates of safechat/train/hardneg.py), keeps the val/test examples of the current data whose
base prompt is in neither training split, scores them on both artifacts' converted GGUFs with
llama.cpp (reusing each artifact's scores.json where it has the example), and prints AUROC and
the rates at a threshold calibrated on these val examples (end of prompt, `--max-fpr`).

    safechat train compare OLD_ARTIFACT runtime/assets/smollm2-135m --old-hardneg-templates 14
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from runtime.artifact import load_artifact
from runtime.fetch import base_smollm2
from runtime.fold import convert_gguf

from . import data, hardneg
from .cls_recipe import calibrate, encode, rates, score_gguf


def _dataset_with_templates(n: int) -> list[dict]:
    """The data set as it was with only the first n hard-negative templates."""
    all_t = dict(hardneg.HARDNEG_TEMPLATES)
    try:
        hardneg.HARDNEG_TEMPLATES.clear()
        hardneg.HARDNEG_TEMPLATES.update(dict(list(all_t.items())[:n]))
        return data.build_dataset(seed=0)
    finally:
        hardneg.HARDNEG_TEMPLATES.clear()
        hardneg.HARDNEG_TEMPLATES.update(all_t)


def _scores(art_dir: Path, encoded: list, base: Path, threads: int) -> dict[str, float]:
    """End-of-prompt p_unsafe per example id: from scores.json where present, else llama.cpp."""
    known = {}
    path = art_dir / "scores.json"
    if path.is_file():
        for split in json.loads(path.read_text()).values():
            known.update({i: ps[0] for i, ps in split.items()})
    missing = [e for e in encoded if e.meta["id"] not in known]
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            gguf = Path(tmp) / "candidate.gguf"
            convert_gguf(base, load_artifact(art_dir), gguf, progress=False)
            prompt_only = [dataclasses.replace(e, positions=e.positions[:1]) for e in missing]
            for e, ps in zip(missing, score_gguf(gguf, prompt_only, threads=threads)):
                known[e.meta["id"]] = ps[0]
    return {e.meta["id"]: known[e.meta["id"]] for e in encoded}


def compare(old: Path, new: Path, old_templates: int | None, max_fpr: float = 0.02, threads: int = 2) -> dict:
    from runtime.backends.llama import LlamaModelFile

    base = base_smollm2()
    cur = data.build_dataset(seed=0)
    prev = cur if old_templates is None else _dataset_with_templates(old_templates)
    trained = {e["base_key"] for d in (cur, prev) for e in d if e["split"] == "train"}
    mf = LlamaModelFile(base, vocab_only=True)
    bos = mf.bos if mf.add_bos else None
    held = {s: [encode(e, mf, mf.chat_template, bos) for e in cur
                if e["split"] == s and e["base_key"] not in trained] for s in ("val", "test")}
    out = {}
    for name, art in (("old", old), ("new", new)):
        sc = {s: _scores(art, held[s], base, threads) for s in held}
        vy = np.array([e.label for e in held["val"]])
        thr = calibrate(np.array([sc["val"][e.meta["id"]] for e in held["val"]]), vy, max_fpr)
        out[name] = {"threshold": thr}
        for s, enc in held.items():
            x = np.array([sc[s][e.meta["id"]] for e in enc])
            y = np.array([e.label for e in enc])
            aug = np.array([e.meta["augmentation"] for e in enc])
            row = rates(x, y, thr)
            row.update({a: rates(x[aug == a], y[aug == a], thr) for a in sorted(set(aug))})
            out[name][s] = row
    return out


def table(res: dict) -> str:
    lines = ["| artifact | split | n | AUROC | TPR | FPR | jailbreak TPR | prefill TPR | hard-negative FPR |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"
    for name in ("old", "new"):
        for s in ("val", "test"):
            r = res[name][s]
            lines.append(f"| {name} | {s} | {r['n']} | {r['auroc']:.3f} | {f(r['tpr'])} | {f(r['fpr'])} | "
                         f"{f(r.get('jailbreak_template', {}).get('tpr'))} | {f(r.get('prefill', {}).get('tpr'))} | "
                         f"{f(r.get('hardneg_template', {}).get('fpr'))} |")
    return "\n".join(lines) + (f"\n\nthresholds calibrated on these val examples (end of prompt): "
                               f"old {res['old']['threshold']:.4f}, new {res['new']['threshold']:.4f}")


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="two artifacts on the held-out examples neither trained on")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    c.add_argument("--old-hardneg-templates", type=int, default=None,
                   help="OLD was trained with only the first N hard-negative templates (dataset v1: 14)")
    c.add_argument("--max-fpr", type=float, default=0.02)
    c.add_argument("--threads", type=int, default=2)
    c.set_defaults(fn=cmd_compare)


def cmd_compare(args) -> int:
    print(table(compare(args.old, args.new, args.old_hardneg_templates, args.max_fpr, args.threads)))
    return 0
