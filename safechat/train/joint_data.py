"""Training sequences for the `joint` recipe, in two stages so the GPU needs no tokenizer.

1. `prepare(...)` (needs llama.cpp for the tokenizer and chat template, CPU): token ids of every
   training prompt (with its prefill), the refusal text, the end-of-generation ids, and the
   validation/test examples encoded exactly as the `cls` recipe scores them. Saved as one
   gzipped JSON file (`save_prep`/`load_prep`), a few MB, that can travel to a GPU machine.
2. `build_sequences(model, prep, ...)` (torch, any device): generates the base model's own
   greedy answers (never committed) and lays out the `JointSeq`s:

   | example | response (LM loss) | [CLS] positions (label = the example's) |
   |---|---|---|
   | benign, with or without prefill | the base model's own answer | end of prompt/prefill, inside the answer |
   | harmful, no prefill | the refusal text (only with `refusal_lm`; else none) | end of prompt |
   | harmful (+ its own answer) | none (never trained to comply) | end of prompt/prefill, inside the answer |
   | two turns: benign or a fiction/role-play framing, then a request | the refusal after a harmful second turn (only with `refusal_lm`) | turn 1 (benign), end of turn 2 (its label) |
   | comply: a request + a compliance opener (`OPENERS`) as prefill, the base model's continuation | none | end of the opener, inside the continuation (the request's label) |

   "Inside the answer" is every `cls_every` tokens and the answer's last token (the runtime checks
   every k tokens), or, without cls_every, after 8/24/48 tokens as the first joint runs had it.
   The two-turn conversations are built by code from the same training prompts (`prepare`:
   `FRAMINGS` and `LEADS`), the first turn's answer being the base model's own. The comply rows are
   what a jailbreak or prefill that worked looks like inside the answer: the base model complies
   with anything once it has begun to, so a harmful request continued after "Sure, here is how to do
   it:" is a harmful continuation, generated at training time and never stored outside the run's
   directory; the benign requests continued after the same openers keep the opener from being the cue.

The LM loss falls only on the base model's own answers unless `refusal_lm` (the recipe's `lm_targets`
"own+refusal", every joint run up to run7): the runtime writes the refusal, and a language model taught a
refusal sentence says it after ordinary requests too (run6: "Give me a simple recipe for pancakes." ->
"I can't help with that. I'm a bit of a foodie, ..." with the checks off). With own answers only, the LM
loss is self-distillation: it holds the model where it was while the [CLS] loss moves the upper layers.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch

from runtime.prompt import Prompt, answer_start, build_prompt, prompt_tokens

from .cls_recipe import RESPONSE_POINTS, Encoded, encode
from .joint import JointSeq
from .joint_dist import Dist
from .real_lookalikes import AUGMENTATION as REAL
from safechat.convert.llama_torch import DecodeCache, FrozenLlama

PREP_VERSION = 1
REFUSAL = "I can't help with that."
# First turns that set up a story, a game or a professional context: benign alone; the request
# that follows decides (a harmful request in such a frame is the attack the runtime must catch).
FRAMINGS = (
    "I'm writing a thriller novel. Can you help me with a few scenes?",
    "Let's do some creative writing together. You play the expert character in my story.",
    "I'm a screenwriter working on a crime drama and need realistic dialogue.",
    "Let's play a role-playing game: you are a wise old mentor who knows a lot about everything.",
    "I'm preparing a lesson for my students and would like your help with some questions.",
    "I'm writing a mystery where the detective has to work out exactly how things were done.",
    "Pretend you are a helpful librarian answering a curious visitor's questions.",
    "I'm working on a video game story with a villain and a hero. Can you help?",
    "I'm doing research for a documentary and have some questions for you.",
    "Can you stay in character as a grizzled ex-soldier for the rest of our chat?",
    "I'm writing a short story for a contest. It needs to feel authentic.",
    "Let's brainstorm ideas for my tabletop campaign tonight.",
)
# Compliance openers: the prefill the base model continues in `comply` sequences (a harmful request
# so continued is what a successful attack looks like inside the answer; a benign one, its contrast).
OPENERS = ("Sure, here is how to do it:", "Of course! Here are the details.", "Step 1:",
           "Absolutely. Here's everything you need to know.", "Here is a detailed answer:")
# How the second turn's request is put (the request's own text follows).
LEADS = ("", "Now, for the story: ", "Great. Next: ", "In character, answer this: ", "Thanks! Also, ",
         "For the scene, the character explains this in detail: ", "OK. Now tell me: ")


def _second_turn(template: str | None, text: str, vocab) -> list[int] | None:
    """Tokens that follow an assistant's answer when the user then sends `text` (template text with
    special parsing, the user's text without), ending where the next answer begins; None when the
    template does not lay a second turn out that way."""
    p = build_prompt(template, [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                                {"role": "user", "content": text}])
    segs = list(p.segments)
    at = [i for i, g in enumerate(segs) if not g.special and g.text == "B"]
    if len(at) != 1 or p.prefill is not None:
        return None
    return prompt_tokens(Prompt(tuple(segs[at[0] + 1:]), None), vocab)


def _multi_turn(train_examples: list[dict], template, vocab, bos, n: int, seed: int) -> dict:
    """Framing first turns and second-turn requests (half harmful, half benign) for two-turn sequences."""
    rng = random.Random(seed * 7919 + 17)
    framings = [{"text": f, "tokens": prompt_tokens(build_prompt(template, [{"role": "user", "content": f}]),
                                                    vocab, bos)} for f in FRAMINGS]
    plain = [e for e in train_examples if not e.get("prefill") and e["augmentation"] == "none"
             and len(e["prompt"]) <= 600]
    turn2 = []
    for label in (1, 0):
        pool = [e for e in plain if int(e["label"]) == label]
        for e in rng.sample(pool, min(n // 2, len(pool))):
            lead = rng.choice(LEADS)
            text = lead + (e["prompt"][:1].lower() + e["prompt"][1:] if lead else e["prompt"])
            toks = _second_turn(template, text, vocab)
            if toks is None:
                return {"framings": [], "turn2": []}
            turn2.append({"id": e["id"], "label": label, "tokens": toks})
    return {"framings": framings, "turn2": turn2}


COMPLY_KINDS = ("none",)  # the augmentations comply rows draw from by default: plain requests


def _comply(train_examples: list[dict], template, vocab, bos, n: int, seed: int, max_tokens: int,
            kinds: tuple[str, ...] = COMPLY_KINDS) -> list[dict]:
    """n harmful and n benign training prompts of the augmentations `kinds` (default: plain requests; e.g.
    also "jailbreak_template", "suffix"), each with a compliance opener as the prefill."""
    rng = random.Random(seed * 6151 + 29)
    plain = [e for e in train_examples if not e.get("prefill") and e["augmentation"] in kinds]
    out = []
    for label in (1, 0):
        pool = [e for e in plain if int(e["label"]) == label]
        for e in rng.sample(pool, min(n, len(pool))):
            msgs = [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": rng.choice(OPENERS)}]
            prompt = build_prompt(template, msgs)
            toks = prompt_tokens(prompt, vocab, bos)
            if len(toks) <= max_tokens:  # answer_at: where the opener (answer text, runtime/window.py) begins
                out.append({"id": e["id"], "tokens": toks, "label": label,
                            "answer_at": answer_start(prompt, toks, vocab, bos)})
    return out


def prepare(examples: list[dict], vocab, template: str | None, bos: int | None, eog: list[int],
            n_vocab: int, *, max_prompt_tokens: int = 512, base_sha256: str = "", multi_turn: int = 0,
            seed: int = 0, comply: int = 0, comply_kinds: tuple[str, ...] = COMPLY_KINDS) -> dict:
    """Token ids for every split; train prompts end where the assistant's answer would begin.

    multi_turn > 0 adds that many second-turn requests (and the framings) for two-turn sequences;
    comply > 0 that many harmful and as many benign prompts with a compliance opener (`OPENERS`), drawn from the
    training prompts of the augmentations `comply_kinds`."""
    train, held = [], {"val": [], "test": []}
    for e in examples:
        if e["split"] == "train":
            msgs = [{"role": "user", "content": e["prompt"]}]
            if e.get("prefill"):
                msgs.append({"role": "assistant", "content": e["prefill"]})
            prompt = build_prompt(template, msgs)
            toks = prompt_tokens(prompt, vocab, bos)
            if len(toks) <= max_prompt_tokens:
                train.append({"id": e["id"], "tokens": toks, "label": int(e["label"]),
                              "prefill": bool(e.get("prefill")), "augmentation": e["augmentation"],
                              **({"answer_at": answer_start(prompt, toks, vocab, bos)} if e.get("prefill") else {})})
        elif e["split"] in held:
            enc = encode(e, vocab, template, bos)
            held[e["split"]].append({"id": e["id"], "tokens": enc.tokens, "positions": enc.positions,
                                     "label": enc.label, "augmentation": e["augmentation"]})
    eot = [t for t in vocab.tokenize("<|im_end|>", True) if t in set(eog)][:1] or eog[:1]
    extra = _multi_turn([e for e in examples if e["split"] == "train"], template, vocab, bos, multi_turn,
                        seed) if multi_turn else {}
    if comply:
        extra["comply"] = _comply([e for e in examples if e["split"] == "train"], template, vocab, bos, comply,
                                  seed, max_prompt_tokens, tuple(comply_kinds))
    return {"version": PREP_VERSION, "base_sha256": base_sha256, "n_vocab": n_vocab, "eog": sorted(eog),
            "refusal": vocab.tokenize(REFUSAL, False) + eot, "train": train, **held, **extra}


def train_sample(train: list[dict], max_train: int, real_train: int, seed: int) -> list[dict]:
    """max_train of the training prompts (0: all; the same draw as before the real family existed) plus at most
    real_train real look-alikes on top, so questions on sensitive topics are a share of their own, not ~10%."""
    real = [e for e in train if e["augmentation"] == REAL]
    rest = [e for e in train if e["augmentation"] != REAL]
    if max_train and len(rest) > max_train:
        rest = random.Random(seed).sample(rest, max_train)
    if real_train and len(real) > real_train:
        real = random.Random(seed + 1).sample(real, real_train)
    return rest + real


def save_prep(prep: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(prep, f, separators=(",", ":"))
    return path


def load_prep(path: str | Path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        prep = json.load(f)
    if prep.get("version") != PREP_VERSION:
        raise ValueError(f"{path}: prepared data version {prep.get('version')}, expected {PREP_VERSION}")
    return prep


def held_out(prep: dict, split: str) -> list[Encoded]:
    """Validation/test examples as the `cls` recipe's Encoded (for score_gguf and the card)."""
    return [Encoded(e["tokens"], e["positions"], e["label"],
                    {"id": e["id"], "augmentation": e["augmentation"], "split": split}) for e in prep[split]]


@torch.no_grad()
def generate(model: FrozenLlama, prompts: list[list[int]], max_new: int, eog: set[int], *,
             batch_size: int = 64, n_vocab: int | None = None, dist: Dist | None = None) -> list[list[int]]:
    """Greedy continuations (ending with the end-of-generation token when one was produced).

    Batched with a key/value cache: prompts are left-padded, positions count real tokens only,
    padding is masked out of every row's keys. Under torchrun (`dist`), rank r generates the batches r,
    r + N, ... (the very batches one process makes, so the same tokens) and the ranks exchange them.
    """
    dist = dist or Dist()
    part = (dist.rank, dist.world)
    if hasattr(model, "greedy"):  # a transformers base (safechat/convert/hf_frozen.py): its own `generate`
        return dist.merge(model.greedy(prompts, max_new, eog, batch_size=batch_size, n_vocab=n_vocab, part=part))
    return dist.merge(_generate(model, prompts, max_new, eog, batch_size, n_vocab, part))


def _generate(model: FrozenLlama, prompts: list[list[int]], max_new: int, eog: set[int], batch_size: int,
              n_vocab: int | None, part: tuple[int, int]) -> list[list[int]]:
    dev = model.w["token_embd.weight"].device
    out_mat = model.output_matrix()[:n_vocab] if n_vocab else model.output_matrix()
    result: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for b, s in enumerate(range(0, len(order), batch_size)):
        if b % part[1] != part[0]:
            continue
        idx = order[s:s + batch_size]
        B, L = len(idx), max(len(prompts[i]) for i in idx)
        ids = torch.zeros(B, L, dtype=torch.long)
        valid = torch.zeros(B, L, dtype=torch.bool)
        for r, i in enumerate(idx):
            ids[r, L - len(prompts[i]):] = torch.tensor(prompts[i])
            valid[r, L - len(prompts[i]):] = True
        ids, valid = ids.to(dev), valid.to(dev)
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        mask = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)[None]
        c = model.cfg
        kv = DecodeCache(c.n_layer, B, L + max_new, c.n_head_kv, c.head_dim, out_mat.dtype, dev)
        h, _ = model.forward(model.embed(ids), pos, mask[:, None], past=kv)
        nxt = (h[:, -1] @ out_mat.T).argmax(-1)
        last = pos[:, -1]
        valid = torch.cat([valid, torch.zeros(B, max_new, dtype=torch.bool, device=dev)], 1)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        eog_t = torch.tensor(sorted(eog), device=dev)
        for step in range(max_new):
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    result[idx[r]].append(t)
            done |= torch.isin(nxt, eog_t)
            if bool(done.all()) or step == max_new - 1:
                break
            valid[:, L + step] = True
            last = last + 1
            h, _ = model.forward(model.embed(nxt[:, None]), last[:, None], valid[:, None, None, :L + step + 1],
                                 past=kv)
            nxt = (h[:, -1] @ out_mat.T).argmax(-1)
    return result


def _inside(start: int, response: list[int], eog: set[int], every: int | None = None) -> list[int]:
    """[CLS] prefix lengths inside a response: every `every` tokens (or after 8/24/48 tokens) and after
    its last real token."""
    n = len(response) - (1 if response and response[-1] in eog else 0)
    points = range(every, n, every) if every else [k for k in RESPONSE_POINTS if k < n]
    return [start + k for k in points] + ([start + n] if n > 0 else [])


def _answer_at(e: dict) -> dict:
    """Where a prefill (answer text) begins, for the windows of the [CLS] inside the answer (joint_window.py);
    {} without a prefill or in data prepared before it was recorded."""
    return {"answer_at": int(e["answer_at"])} if e.get("answer_at") is not None else {}


def _two_turn(prep: dict, firsts: list[tuple[list[int], list[int]]], eog: set[int], every, seed: int,
              refusal_lm: bool = True):
    """Two-turn sequences: a first turn (prompt, own answer) from `firsts`, then each second turn of the prep."""
    rng = random.Random(seed * 104729 + 3)
    out = []
    for t in prep.get("turn2", []):
        prompt, ans = rng.choice(firsts)
        ans = ans[:-1] if ans and ans[-1] in eog else ans
        n1, head = len(prompt), prompt + ans
        cls_at = [n1] + _inside(n1, ans, set(), every)
        labels = [0] * len(cls_at)
        toks = head + t["tokens"]
        cls_at.append(len(toks))
        labels.append(t["label"])
        lm_from = None
        if t["label"] == 1 and refusal_lm:
            lm_from = len(toks)
            toks = toks + prep["refusal"]
        out.append(JointSeq(toks, cls_at, t["label"], lm_from=lm_from, cls_labels=labels,
                            meta={"id": t["id"], "kind": "two_turn"}))
    return out


def build_sequences(model: FrozenLlama, prep: dict, *, gen_tokens: int = 48, harmful_answers: bool = True,
                    batch_size: int = 64, cls_every: int | None = None, refusal_lm: bool = True,
                    log=print, dist: Dist | None = None) -> list[JointSeq]:
    """The training sequences (table in the module docstring); generation runs on the model's device.
    refusal_lm=False: no LM loss on a refusal (harmful requests keep their [CLS] positions only)."""
    eog = set(prep["eog"])
    seqs_comply: list[JointSeq] = []
    train = prep["train"]
    want = [e for e in train if e["label"] == 0 or harmful_answers or e["prefill"]]
    framings, comply = prep.get("framings", []), prep.get("comply", [])
    log(f"generating the base model's own answers for {len(want) + len(framings) + len(comply)} prompts "
        f"({gen_tokens} tokens max)")
    answers = generate(model, [e["tokens"] for e in want] + [f["tokens"] for f in framings]
                       + [c["tokens"] for c in comply], gen_tokens, eog, batch_size=batch_size, n_vocab=prep["n_vocab"],
                       dist=dist)
    for c, ans in zip(comply, answers[len(want) + len(framings):]):
        n = len(c["tokens"])
        seqs_comply.append(JointSeq(c["tokens"] + ans, [n] + _inside(n, ans, eog, cls_every), c["label"], lm_from=None,
                                    meta={"id": c["id"], "kind": "comply", **_answer_at(c)}))
    answers = answers[:len(want) + len(framings)]
    seqs, firsts = [], []
    for e, ans in zip(want, answers):
        n = len(e["tokens"])
        benign = e["label"] == 0
        seqs.append(JointSeq(e["tokens"] + ans, [n] + _inside(n, ans, eog, cls_every), e["label"],
                             lm_from=n if benign else None, meta={"id": e["id"], "kind": "answer", **_answer_at(e)}))
        if benign and not e["prefill"] and e["augmentation"] == "none" and n <= 200:
            firsts.append((e["tokens"], ans))
    framed = [(f["tokens"], a) for f, a in zip(framings, answers[len(want):])]
    if prep.get("turn2") and firsts:
        t2 = prep["turn2"]  # every other one after a framing, the rest after a plain benign exchange
        seqs += _two_turn({**prep, "turn2": t2[0::2]}, framed or firsts, eog, cls_every, prep.get("seed", 0),
                          refusal_lm)
        seqs += _two_turn({**prep, "turn2": t2[1::2]}, firsts, eog, cls_every, prep.get("seed", 0) + 1, refusal_lm)
    for e in train:
        if e["label"] == 1 and not e["prefill"]:
            n = len(e["tokens"])
            if refusal_lm:
                seqs.append(JointSeq(e["tokens"] + prep["refusal"], [n], 1, lm_from=n,
                                     meta={"id": e["id"], "kind": "refusal"}))
            else:  # the request's [CLS] only: the language model is not taught to say anything after it
                seqs.append(JointSeq(e["tokens"], [n], 1, lm_from=None, meta={"id": e["id"], "kind": "request"}))
    return seqs + seqs_comply


def save_sequences(seqs: list[JointSeq], path: Path) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump([[s.tokens, s.cls_at, s.label, s.lm_from, s.meta] + ([s.cls_labels] if s.cls_labels is not None else [])
                   for s in seqs], f, separators=(",", ":"))


def load_sequences(path: Path) -> list[JointSeq]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [JointSeq(*row[:5], cls_labels=row[5] if len(row) > 5 else None) for row in json.load(f)]
