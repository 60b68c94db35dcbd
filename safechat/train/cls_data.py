"""The data as `train cls` trains on it: examples by split, the training sequences, own answers.

Shared by `safechat train cls` and `safechat bench cls_variants` (which measures variants of the
recipe on exactly these sequences)."""
from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path

from runtime.prompt import prompt_template

from . import data
from .cls_recipe import encode
from .own_answers import add_own_answers


def training_set(args, base: Path):
    """The data as `train cls` trains on it: (model file, examples by split, training sequences, own-answers
    record or None, stage seconds). Deterministic in the arguments (seed, max_tokens, max_plain, own_*).
    Prompts use the base file's chat template (`runtime.prompt.prompt_template`: Gemma's turns for a gemma3
    file without one)."""
    from runtime.backends.llama import LlamaModelFile  # here: `report` and `joint` run without llama.cpp

    t0 = time.time()
    examples = data.build_dataset(seed=args.seed, suffixes=getattr(args, "suffixes", False))
    mf = LlamaModelFile(base)
    bos = mf.bos if mf.add_bos else None
    encoded = [encode(e, mf, prompt_template(mf), bos) for e in examples]
    by_split = defaultdict(list)
    for e in encoded:
        by_split[e.meta["split"]].append(e)
    rng = random.Random(args.seed)
    if args.eval_limit:
        for sp in ("val", "test"):
            by_split[sp] = rng.sample(by_split[sp], min(args.eval_limit, len(by_split[sp])))
    train = [e for e in by_split["train"] if len(e.tokens) <= args.max_tokens]
    plain = [e for e in train if e.meta["augmentation"] == "none"]
    other = [e for e in train if e.meta["augmentation"] != "none"]
    if len(plain) > args.max_plain:
        plain = rng.sample(plain, args.max_plain)
    train = other + plain
    stages = {"data": round(time.time() - t0, 1)}
    own = None
    if args.own_answers:
        t1 = time.time()
        train, own = add_own_answers(base, train, n_harmful=args.own_harmful, n_benign=args.own_benign,
                                     hardneg=args.own_hardneg, seed=args.seed, threads=args.threads)
        stages["own_answers"] = round(time.time() - t1, 1)
        print(f"own answers: {own}")
    return mf, examples, by_split, train, own, stages
