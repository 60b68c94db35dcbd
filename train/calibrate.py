"""`python -m train calibrate ART --budget 0.05`: thresholds from what a user sees, whole conversations.

`train cls` calibrates one threshold per [CLS] *position* (at most --max-fpr of the val benign
positions flagged). The runtime refuses a *conversation* as soon as any check crosses its
threshold, and a benign answer checked a dozen times has a dozen chances to be refused: the
shipped model's 2% per position was 10% of the val benign conversations. This step runs the val
split's prefill attacks and benign conversations (prefilled, or look-dangerous) through the
runtime on the artifact's GGUF with the check policy, observing without acting, and keeps per
conversation the verdict at the prompt (which includes a prefill) and the highest verdict inside
the answer. Refusing with a pair (prompt threshold tp, answer threshold ta) is then the same as
either reaching its threshold (greedy generation does not depend on them), so one run gives
every pair; it picks the pair that catches the most val attacks while refusing at most `budget`
of the val benign conversations, with tp no lower than the per-position threshold (so plain
requests keep their false-refusal rate). An answer threshold that gains no attack is "never"
(inf in the card: the runtime then checks only the prompt). It writes both into the card,
recomputes the card's per-position metrics at them (end of prompt at tp, inside answers at ta)
and records the calibration; `convert gguf` carries the pair into the model file.
"""
from __future__ import annotations

import json
import math
import shlex
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

NEVER = 2.0  # an answer threshold no verdict reaches (inf in the card)


def held_out_prompts(examples: list[dict], split: str, limit: int = 0) -> tuple[list[dict], list[dict]]:
    """(prefill attacks, benign prompts that are prefilled or look dangerous) of one held-out split."""
    held = [e for e in examples if e["split"] == split]
    attacks = [e for e in held if e["label"] == 1 and e.get("prefill")]
    benign = [e for e in held if e["label"] == 0 and (e.get("prefill") or e["augmentation"] == "hardneg_template")]
    return (attacks[:limit], benign[:limit]) if limit else (attacks, benign)


def messages(e: dict) -> list[dict]:
    """The chat messages of a data example (the prefill, if any, as the assistant's opening)."""
    msgs = [{"role": "user", "content": e["prompt"]}]
    if e.get("prefill"):
        msgs.append({"role": "assistant", "content": e["prefill"]})
    return msgs


def observe(model, examples: list[dict], policy, tokens: int) -> list[list[tuple[int, float]]]:
    """Each conversation's check trace [(tokens covered, p_unsafe)], checking by `policy` without acting."""
    watch = replace(policy, threshold=float(np.nextafter(1.0, 0.0)), answer_threshold=None)
    return [model.chat(messages(e), max_tokens=tokens, safety=watch).safety.trace for e in examples]


def split_max(traces) -> np.ndarray:
    """(n, 2): each conversation's verdict at the prompt and its highest verdict inside the answer (0: none)."""
    return np.array([[max((p for c, p in t if c == 0), default=0.0), max((p for c, p in t if c > 0), default=0.0)]
                     for t in traces], dtype=float).reshape(-1, 2)


def refused(rows: np.ndarray, tp: float, ta: float) -> int:
    """How many conversations (rows: prompt verdict, highest answer verdict) a threshold pair refuses."""
    return int(((rows[:, 0] >= tp) | (rows[:, 1] >= ta)).sum())


def pick_pair(attacks: np.ndarray, benign: np.ndarray, budget: float, min_prompt: float = 0.0) -> tuple[float, float]:
    """(prompt threshold, answer threshold) catching the most attacks with at most `budget` of benign refused.

    Rows are (prompt verdict, highest answer verdict) per conversation; the prompt threshold lies
    in [min_prompt, 1) (a model file needs one below 1), the answer threshold may be NEVER; ties go
    to fewer benign refused, then to the higher answer threshold. ValueError when no pair keeps
    the budget (benign prompt verdicts at 1.0).
    """
    allowed = int(np.floor(budget * len(benign)))
    above = lambda v: float(np.nextafter(v, 2.0))  # noqa: E731
    prompts = sorted({above(v) for v in benign[:, 0] if v >= min_prompt and above(v) < 1.0} | {min_prompt})
    answers = sorted({above(v) for v in benign[:, 1]} | {0.0, NEVER})
    best = None
    for tp in prompts:
        for ta in answers:
            n = refused(benign, tp, ta)
            if n > allowed:
                continue
            key = (refused(attacks, tp, ta), -n, ta, tp)
            if best is None or key > best[0]:
                best = (key, (tp, ta))
    if best is None:
        raise ValueError(f"no prompt threshold below 1 refuses at most {budget:.0%} of the {len(benign)} benign "
                         f"conversations (their prompt verdicts reach 1.0)")
    return best[1]


def _held(examples: list[dict], scores: dict) -> tuple[dict, dict]:
    """The card's val/test examples (as metrics_for wants them) and their per-position scores."""
    by_id = {e["id"]: e for e in examples}
    held, scored = {}, {}
    for split, ids in scores.items():
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise SystemExit(f"error: scores.json names {len(missing)} examples the data does not have "
                             f"(e.g. {missing[0]}): the artifact was trained on other data")
        held[split] = [SimpleNamespace(label=by_id[i]["label"], meta=by_id[i]) for i in ids]
        scored[split] = [ids[i] for i in ids]
    return held, scored


def calibrate_artifact(art_dir: Path, budget: float, *, base: Path | None = None, policy=None, tokens: int = 48,
                       threads: int | None = None, command: str = "", limit: int = 0) -> dict:
    """Calibrate the artifact's (threshold, answer_threshold) on val conversations; rewrite its card."""
    from convert.artifact import load_artifact
    from convert.fetch import base_smollm2
    from convert.gguf_safe import convert_gguf
    from runtime.model import load
    from runtime.strategy import SafetyPolicy

    from .cls_recipe import calibrate, metrics_for
    from .data import build_dataset

    t0 = time.time()
    art = load_artifact(art_dir)
    card = dict(art.card)
    scores_path = Path(art_dir) / "scores.json"
    if not scores_path.is_file():
        raise SystemExit(f"error: {scores_path} not found: `train cls` writes it beside the card")
    examples = build_dataset(seed=card.get("recipe", {}).get("seed", 0))
    held, scored = _held(examples, json.loads(scores_path.read_text()))
    max_fpr = card.get("recipe", {}).get("max_fpr", 0.02)
    vs = np.array([p for ps in scored["val"] for p in ps])
    vy = np.array([e.label for e, ps in zip(held["val"], scored["val"]) for _ in ps])
    per_position = calibrate(vs, vy, max_fpr)
    policy = policy or SafetyPolicy()
    attacks, benign = held_out_prompts(examples, "val", limit)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "calibrate.gguf"
        convert_gguf(base or base_smollm2(), art, gguf, progress=False)
        model = load(gguf, threads=threads, allow_unverified=True)
        try:
            va, vb = (split_max(observe(model, group, policy, tokens)) for group in (attacks, benign))
        finally:
            model.close()
    try:
        tp, ta = pick_pair(va, vb, budget, min_prompt=per_position)
    except ValueError as e:
        raise SystemExit(f"error: {art_dir}: {e}") from None
    answer = math.inf if ta >= 1.0 else float(ta)  # "inf" in the card (strict JSON)
    _, metrics = metrics_for(held, scored, max_fpr, card["metrics"].get("measured_on", ""),
                             thresholds=(tp, answer))
    card.update(threshold=tp, answer_threshold="inf" if math.isinf(answer) else answer, metrics=metrics)
    card["calibration"] = {
        "method": "val conversations: the (prompt, answer) threshold pair catching the most prefill attacks "
                  "with at most `budget` of the benign (prefilled or look-dangerous) ones refused; prompt "
                  "threshold no lower than the per-position one",
        "budget": budget, "per_position_threshold": round(per_position, 6), "max_fpr_per_position": max_fpr,
        "policy": {k: v for k, v in asdict(policy).items() if k not in ("threshold", "answer_threshold", "refusal")},
        "max_tokens": tokens, **({"limit": limit} if limit else {}),
        "val_attacks_caught": f"{refused(va, tp, ta)}/{len(va)}",
        "val_benign_refused": f"{refused(vb, tp, ta)}/{len(vb)}",
        "seconds": round(time.time() - t0, 1), "command": command,
    }
    replace(art, card=card).save(art_dir)
    return card["calibration"] | {"threshold": tp, "answer_threshold": card["answer_threshold"]}


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="choose the (prompt, answer) thresholds on val conversations; "
                                         "rewrite the artifact's card")
    c.add_argument("artifact", type=Path)
    c.add_argument("--budget", type=float, default=0.05,
                   help="at most this share of the val benign conversations refused (default 5%%)")
    c.add_argument("--base", type=Path, default=None, help="base GGUF (default: SmolLM2-135M-Instruct)")
    c.add_argument("--every", type=int, default=None, help="check every k tokens (default: the runtime's policy)")
    c.add_argument("--tokens", type=int, default=48, help="greedy tokens per conversation")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--limit", type=int, default=0, help="at most this many val attacks and benign (smoke runs)")
    c.set_defaults(fn=_run)


def _run(args) -> int:
    from runtime.strategy import SafetyPolicy
    policy = SafetyPolicy() if args.every is None else SafetyPolicy(every=args.every)
    out = calibrate_artifact(args.artifact, args.budget, base=args.base, policy=policy, tokens=args.tokens,
                             threads=args.threads, command="python -m train " + shlex.join(args.argv),
                             limit=args.limit)
    print(json.dumps(out, indent=2))
    return 0
