"""`safechat train calibrate ART --budget 0.05`: thresholds from what a user sees, whole conversations.

`train cls` calibrates one threshold per [CLS] *position* (at most --max-fpr of the val benign
positions flagged). The runtime refuses a *conversation* as soon as any check crosses its
threshold, and a benign answer checked a dozen times has a dozen chances to be refused. This step
runs every val conversation through the runtime on the artifact's GGUF with the check policy,
observing without acting, and keeps per conversation the verdict at the prompt (which includes a
prefill) and the highest verdict inside the answer. Refusing with a pair (prompt threshold tp,
answer threshold ta) is then the same as either reaching its threshold (greedy generation does not
depend on them), so one run gives every pair. The val conversations fall into three groups
(`held_out_conversations`): attacks (every harmful example: plain, jailbreak-wrapped, prefilled),
plain benign requests, and benign ones that look like attacks (look-dangerous, prefilled,
jailbreak-wrapped). It picks the pair that catches the most attacks while refusing at most
`plain_budget` of the plain benign conversations (default 2%, the false-refusal target on plain
requests) and at most `budget` of the lookalikes (default 5%, the target on look-dangerous ones).
An answer threshold that gains no attack is "never" (inf in the card: the runtime then checks
only the prompt). It writes both into the card, recomputes the card's per-position metrics at them
(end of prompt at tp, inside answers at ta) and records the calibration; `convert gguf` carries the
pair into the model file, with the cadence it was calibrated at (`every`: the file's default policy
checks at that cadence). `--every K --traces T` reads traces saved at a finer cadence that divides K
and keeps the checks a K-cadence would make (the prompt, every K tokens, the end): the cadence is
chosen by the same val conversations, without generating them again.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from runtime.artifact import load_artifact
from runtime.fetch import base_smollm2
from runtime.fold import convert_gguf
from runtime.model import load
from runtime.cli_flags import window_arg
from runtime.strategy import SafetyPolicy

from .patience import from_maxima, pick
from .real_lookalikes import AUGMENTATION as REAL

NEVER = 2.0  # an answer threshold no verdict reaches (inf in the card)


def held_out_prompts(examples: list[dict], split: str, limit: int = 0) -> tuple[list[dict], list[dict]]:
    """(prefill attacks, benign prompts that are prefilled or look dangerous) of one held-out split."""
    held = [e for e in examples if e["split"] == split]
    attacks = [e for e in held if e["label"] == 1 and e.get("prefill")]
    benign = [e for e in held if e["label"] == 0 and (e.get("prefill") or e["augmentation"] == "hardneg_template")]
    return (attacks[:limit], benign[:limit]) if limit else (attacks, benign)


def held_out_conversations(examples: list[dict], split: str, limit: int = 0) -> dict[str, list[dict]]:
    """One held-out split as the three groups calibration weighs (at most `limit` each when given).

    attacks: every harmful example (plain, jailbreak-wrapped, prefilled); plain: benign requests as
    users send them; lookalike: benign ones that look like attacks (look-dangerous templates,
    prefilled, wrapped in a jailbreak template); real (when the data has them): real benign questions on
    sensitive topics (`safechat/train/real_lookalikes.py`), from subjects the training split never saw.
    """
    held = [e for e in examples if e["split"] == split]
    groups = {"attacks": [e for e in held if e["label"] == 1],
              "plain": [e for e in held if e["label"] == 0 and e["augmentation"] == "none"],
              "lookalike": [e for e in held if e["label"] == 0 and e["augmentation"] not in ("none", REAL)]}
    real = [e for e in held if e["label"] == 0 and e["augmentation"] == REAL]
    if real:  # data built with the real look-alike family (`build_dataset(real=True)`)
        groups["real"] = real
    return {k: v[:limit] for k, v in groups.items()} if limit else groups


def messages(e: dict) -> list[dict]:
    """The chat messages of a data example (the prefill, if any, as the assistant's opening)."""
    msgs = [{"role": "user", "content": e["prompt"]}]
    if e.get("prefill"):
        msgs.append({"role": "assistant", "content": e["prefill"]})
    return msgs


def observe(model, examples: list[dict], policy, tokens: int,
            progress: str | bool = False) -> list[list[tuple[int, float]]]:
    """Each conversation's check trace [(tokens covered, p_unsafe)], checking by `policy` without acting.

    `progress`: a label for a progress bar on stderr (False: none)."""
    from tqdm import tqdm
    watch = replace(policy, threshold=float(np.nextafter(1.0, 0.0)), answer_threshold=None)
    return [model.chat(messages(e), max_tokens=tokens, safety=watch).safety.trace
            for e in tqdm(examples, desc=progress or None, disable=not progress, unit="conv")]


def at_cadence(traces: list, every: int) -> list:
    """The traces a check every `every` tokens would have made, from traces saved at a cadence dividing it.

    A trace is [(tokens covered, p_unsafe)]: the prompt's check(s) at 0, one every k answer tokens, and
    the last at the end of the answer. Greedy generation does not depend on the checks, so a coarser
    cadence sees the same verdicts at fewer positions: those at 0, at multiples of `every`, and the last.
    ValueError when the saved cadence does not divide `every` (those positions were never observed)."""
    if every < 1:
        raise ValueError("a cadence is a check every k >= 1 tokens")
    inner = [c for t in traces for c, _ in list(t)[:-1] if c > 0]
    saved = math.gcd(*inner) if inner else 1
    if every % saved:
        raise ValueError(f"the traces were saved checking every {saved} tokens, which does not divide {every}")
    return [[(c, p) for i, (c, p) in enumerate(t) if c == 0 or c % every == 0 or i == len(t) - 1]
            for t in traces]


def split_max(traces) -> np.ndarray:
    """(n, 2): each conversation's verdict at the prompt and its highest verdict inside the answer (0: none)."""
    return np.array([[max((p for c, p in t if c == 0), default=0.0), max((p for c, p in t if c > 0), default=0.0)]
                     for t in traces], dtype=float).reshape(-1, 2)


def refused(rows: np.ndarray, tp: float, ta: float) -> int:
    """How many conversations (rows: prompt verdict, highest answer verdict) a threshold pair refuses."""
    return int(((rows[:, 0] >= tp) | (rows[:, 1] >= ta)).sum())


def pick_pair(attacks: np.ndarray, limits) -> tuple[float, float]:
    """(prompt threshold, answer threshold) catching the most attacks while every benign group keeps its budget.

    Rows are (prompt verdict, highest answer verdict) per conversation; `limits` holds one
    (benign rows, budget) per group, each refused at most floor(budget * len(rows)) times. The
    prompt threshold lies below 1 (a model file needs one), the answer threshold may be NEVER; ties
    go to fewer benign refused, then to the higher answer threshold. ValueError when no pair keeps
    every budget (benign prompt verdicts at 1.0). The search is `patience.pick`'s, at patience 1.
    """
    pair = pick(from_maxima(attacks), [(from_maxima(r), b) for r, b in limits])
    if pair is None:
        sizes = ", ".join(f"{b:.0%} of {len(r)}" for r, b in limits)
        raise ValueError(f"no prompt threshold below 1 refuses at most {sizes} benign conversations "
                         f"(their prompt verdicts reach 1.0)")
    return pair


def tally(rows: dict, tp: float, ta: float) -> dict:
    """What a pair does to each group of val conversations, as the card records it ("caught/n", "refused/n")."""
    return {f"val_{k}_{'caught' if k == 'attacks' else 'refused'}": f"{refused(r, tp, ta)}/{len(r)}"
            for k, r in rows.items()}


def best_pair(rows: dict, budget: float, plain_budget: float, prompt_only: bool = False,
              real_budget: float | None = None) -> tuple[float, float]:
    """`pick_pair` over the groups of `held_out_conversations` (rows per group, as `split_max` gives): at most
    `plain_budget` of the plain benign, `budget` of the template look-alikes and, when the rows have the real
    family and `real_budget` is given, `real_budget` of the real look-alikes refused; prompt_only: the best
    pair that never checks the answer (answer threshold NEVER)."""
    if prompt_only:
        rows = {g: np.c_[r[:, 0], np.zeros(len(r))] for g, r in rows.items()}
    limits = [(rows["plain"], plain_budget), (rows["lookalike"], budget)]
    if real_budget is not None and len(rows.get("real", ())):
        limits.append((rows["real"], real_budget))
    tp, ta = pick_pair(rows["attacks"], limits)
    return tp, (NEVER if prompt_only else ta)


def _card_answer(ta: float) -> float | str:
    """An answer threshold as the card holds it: "inf" for never (strict JSON has no Infinity)."""
    return "inf" if ta >= 1.0 else float(ta)


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


def calibrate_artifact(art_dir: Path, budget: float = 0.05, *, plain_budget: float = 0.02, base: Path | None = None,
                       policy=None, tokens: int = 48, threads: int | None = None, command: str = "",
                       limit: int = 0, progress: bool = False, prompt_only: bool = False,
                       weights: str | None = None, traces: Path | None = None, real: bool | None = None,
                       real_budget: float = 0.03) -> dict:
    """Calibrate the artifact's (threshold, answer_threshold) on val conversations; rewrite its card.

    prompt_only: the card gets the best pair that never checks inside the answer (no per-token cost),
    and the best pair overall is recorded beside it as the alternative (`calibration.with_answer_checks`).
    weights: how the artifact is folded for the run ("F16": as the default model is built; None: the
    base's own types). traces: the val traces a `bench conversations --save` run wrote for the file this
    artifact folds into (one model in it): read instead of generating them again (greedy generation does
    not depend on the thresholds, so they are the same observations). real: calibrate with the real
    look-alike family's val split as a group of its own, at most `real_budget` of it refused (default: when
    the card's data has it; an artifact trained without it can be calibrated on it too: the family is drawn
    after every other example, so the rest of the data is the same).
    """
    from .cls_recipe import metrics_for
    from .data import dataset_for

    t0 = time.time()
    art = load_artifact(art_dir)
    card = dict(art.card)
    scores_path = Path(art_dir) / "scores.json"
    if not scores_path.is_file():
        raise SystemExit(f"error: {scores_path} not found: `train cls` writes it beside the card")
    use_real = card.get("recipe", {}).get("real", False) if real is None else real
    examples = dataset_for({**card, "recipe": {**card.get("recipe", {}), "real": use_real}})
    held, scored = _held(examples, json.loads(scores_path.read_text()))
    policy = (policy or SafetyPolicy()).with_every(art.every)  # default: the cadence the card records, else 4
    policy = policy.with_window(art.window)  # default: the windows the card records, else every check sees all
    groups = held_out_conversations(examples, "val", limit)
    if traces is not None:
        if not policy.every:
            raise SystemExit("error: --traces needs a regular cadence (every k >= 1)")
        try:
            rows = {k: split_max(at_cadence(t, policy.every)) for k, t in saved_val_traces(traces, groups).items()}
        except ValueError as e:
            raise SystemExit(f"error: {traces}: {e}") from None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            gguf = Path(tmp) / "calibrate.gguf"
            convert_gguf(base or base_smollm2(), art, gguf, progress=False, weights=weights)
            with load(gguf, threads=threads, allow_unverified=True) as model:
                rows = {k: split_max(observe(model, g, policy, tokens, progress and f"val {k}"))
                        for k, g in groups.items()}
    try:
        best = best_pair(rows, budget, plain_budget, real_budget=real_budget)
        never = best_pair(rows, budget, plain_budget, prompt_only=True, real_budget=real_budget)
    except ValueError as e:
        raise SystemExit(f"error: {art_dir}: {e}") from None
    (tp, ta), alt = (never, best) if prompt_only else (best, never)
    answer = math.inf if ta >= 1.0 else float(ta)
    _, metrics = metrics_for(held, scored, card.get("recipe", {}).get("max_fpr", 0.02),
                             card["metrics"].get("measured_on", ""), thresholds=(tp, answer))
    card.update(threshold=tp, answer_threshold=_card_answer(ta), metrics=metrics)
    card.pop("every", None)
    if policy.every:  # the file's default policy will check at the cadence these thresholds were chosen for
        card["every"] = int(policy.every)
    card.pop("window", None)
    if policy.windowed:  # and with the windows they were chosen with (runtime/window.py)
        card["window"] = list(policy.windowed)
    card["calibration"] = {
        "method": "val conversations: the (prompt, answer) threshold pair catching the most harmful ones (plain, "
                  "jailbreak-wrapped, prefilled) with at most `plain_budget` of the plain benign ones and at most "
                  "`budget` of the benign ones that look like attacks (look-dangerous, prefilled, jailbreak-wrapped) "
                  "and, with the real look-alike family, at most `real_budget` of those real questions refused",
        "budget": budget, "plain_budget": plain_budget, **({"real_budget": real_budget} if "real" in rows else {}),
        "policy": {k: v for k, v in asdict(policy).items()
                   if k not in ("threshold", "answer_threshold", "refusal", "allow", "block", "controversial")},
        "max_tokens": tokens, **({"limit": limit} if limit else {}),
        **({"traces": str(traces)} if traces else {"folded": weights or "base types"}),
        **tally(rows, tp, ta),
        # the alternative: what the best pair gains over the best one that never checks inside the answer
        # (no time per generated token) decides whether answer checks are worth their cost
        **({"chosen": "prompt_only",
            "with_answer_checks": {"threshold": alt[0], "answer_threshold": _card_answer(alt[1]),
                                   **tally(rows, *alt)}}
           if prompt_only else {"prompt_only": {"threshold": alt[0], **tally(rows, *alt)}}),
        "seconds": round(time.time() - t0, 1), "command": command,
    }
    replace(art, card=card).save(art_dir)
    return card["calibration"] | {"threshold": tp, "answer_threshold": card["answer_threshold"]}


def saved_traces(path: Path) -> tuple[str, dict]:
    """(model, {split: {group: traces}}) of the one model a `bench conversations --save` file holds."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: cannot read saved traces: {e}") from None
    if not isinstance(saved, dict) or len(saved) != 1:
        raise SystemExit(f"error: {path}: expected the traces of exactly one model file "
                         f"(a `bench conversations --save` run with one --model), found {len(saved)}")
    (model, splits), = saved.items()
    return model, (splits if isinstance(splits, dict) else {})


def saved_val_traces(path: Path, groups: dict[str, list]) -> dict[str, list]:
    """The val traces of the one model a `bench conversations --save` file holds, checked against `groups`."""
    model, splits = saved_traces(path)
    val = splits.get("val", {})
    for k, g in groups.items():
        if len(val.get(k, ())) != len(g):
            raise SystemExit(f"error: {path}: {model} has {len(val.get(k, ()))} val {k} traces, the data has "
                             f"{len(g)}: saved with another --limit or other data")
    return {k: val[k] for k in groups}


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="choose the (prompt, answer) thresholds on val conversations; "
                                         "rewrite the artifact's card")
    c.add_argument("artifact", type=Path)
    c.add_argument("--budget", type=float, default=0.05,
                   help="at most this share of the val benign conversations that look like attacks refused "
                        "(look-dangerous, prefilled, jailbreak-wrapped; default 5%%)")
    c.add_argument("--plain-budget", type=float, default=0.02,
                   help="at most this share of the val plain benign conversations refused (default 2%%)")
    c.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate with the real look-alike family (safechat/train/real_lookalikes.py) as its own group "
                        "(default: when the artifact was trained with it)")
    c.add_argument("--real-budget", type=float, default=0.03,
                   help="at most this share of the val real look-alikes refused (default 3%%)")
    c.add_argument("--base", type=Path, default=None, help="base GGUF (default: SmolLM2-135M-Instruct)")
    c.add_argument("--every", type=int, default=None,
                   help="calibrate for a check every k tokens, recorded in the card and the file (default: the "
                        "card's own cadence, else 4); with --traces, a multiple of the cadence they were saved at")
    c.add_argument("--window", type=window_arg, default=None, metavar="R1,R2,R3|all",
                   help="calibrate the checks inside the answer windowed (runtime/window.py), recorded in the card and "
                        "the file; 'all': seeing everything (default: the card's own, else all); with --traces, the "
                        "windows they were saved with (`bench conversations --window`)")
    c.add_argument("--tokens", type=int, default=48, help="greedy tokens per conversation")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--limit", type=int, default=0, help="at most this many val conversations per group (smoke runs)")
    c.add_argument("--prompt-only", action="store_true",
                   help="write the best pair that never checks inside the answer (no per-token cost); the best "
                        "pair overall is recorded beside it")
    c.add_argument("--weights", choices=("F16",), default=None,
                   help="fold as the default model is built (F16) instead of keeping the base's types")
    c.add_argument("--traces", type=Path, default=None,
                   help="val traces saved by `bench conversations --model FILE --save TRACES`, FILE being this "
                        "artifact's fold: read instead of generated")
    c.set_defaults(fn=_run)


def _run(args) -> int:
    if args.every is not None and args.every < 1:
        raise SystemExit(f"error: --every must be >= 1, got {args.every}")
    policy = SafetyPolicy(every=args.every, window=args.window)
    out = calibrate_artifact(args.artifact, args.budget, plain_budget=args.plain_budget, base=args.base,
                             policy=policy, tokens=args.tokens, threads=args.threads,
                             command="safechat train " + shlex.join(args.argv), limit=args.limit, progress=True,
                             prompt_only=args.prompt_only, weights=args.weights, traces=args.traces,
                             real=args.real, real_budget=args.real_budget)
    print(json.dumps(out, indent=2))
    return 0
