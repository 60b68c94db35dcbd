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
   | harmful, no prefill | the refusal text | end of prompt |
   | harmful (+ its own answer) | none (never trained to comply) | end of prompt/prefill, inside the answer |
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from runtime.prompt import build_prompt, prompt_tokens

from .cls_recipe import RESPONSE_POINTS, Encoded, encode
from .joint import JointSeq
from .llama_torch import FrozenLlama

PREP_VERSION = 1
REFUSAL = "I can't help with that."


def prepare(examples: list[dict], tokenize, template: str | None, bos: int | None, eog: list[int],
            n_vocab: int, *, max_prompt_tokens: int = 512, base_sha256: str = "") -> dict:
    """Token ids for every split; train prompts end where the assistant's answer would begin."""
    train, held = [], {"val": [], "test": []}
    for e in examples:
        if e["split"] == "train":
            msgs = [{"role": "user", "content": e["prompt"]}]
            if e.get("prefill"):
                msgs.append({"role": "assistant", "content": e["prefill"]})
            toks = prompt_tokens(build_prompt(template, msgs), tokenize, bos)
            if len(toks) <= max_prompt_tokens:
                train.append({"id": e["id"], "tokens": toks, "label": int(e["label"]),
                              "prefill": bool(e.get("prefill")), "augmentation": e["augmentation"]})
        elif e["split"] in held:
            enc = encode(e, tokenize, template, bos)
            held[e["split"]].append({"id": e["id"], "tokens": enc.tokens, "positions": enc.positions,
                                     "label": enc.label, "augmentation": e["augmentation"]})
    eot = [t for t in tokenize("<|im_end|>", True) if t in set(eog)][:1] or eog[:1]
    return {"version": PREP_VERSION, "base_sha256": base_sha256, "n_vocab": n_vocab, "eog": sorted(eog),
            "refusal": tokenize(REFUSAL, False) + eot, "train": train, **held}


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
             batch_size: int = 64, n_vocab: int | None = None) -> list[list[int]]:
    """Greedy continuations (ending with the end-of-generation token when one was produced).

    Batched with a key/value cache: prompts are left-padded, positions count real tokens only,
    padding is masked out of every row's keys.
    """
    dev = model.w["token_embd.weight"].device
    out_mat = model.output_matrix()[:n_vocab] if n_vocab else model.output_matrix()
    result: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
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
        h, kv = model.forward(model.embed(ids), pos, mask[:, None], keep_kv=True)
        nxt = (h[:, -1] @ out_mat.T).argmax(-1)
        last = pos[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        eog_t = torch.tensor(sorted(eog), device=dev)
        for step in range(max_new):
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    result[idx[r]].append(t)
            done |= torch.isin(nxt, eog_t)
            if bool(done.all()) or step == max_new - 1:
                break
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
            last = last + 1
            h, kv = model.forward(model.embed(nxt[:, None]), last[:, None], valid[:, None, None, :],
                                  past=kv, keep_kv=True)
            nxt = (h[:, -1] @ out_mat.T).argmax(-1)
    return result


def _inside(start: int, response: list[int], eog: set[int]) -> list[int]:
    """[CLS] prefix lengths inside a response: after 8/24/48 tokens and after its last real token."""
    n = len(response) - (1 if response and response[-1] in eog else 0)
    return [start + k for k in RESPONSE_POINTS if k < n] + ([start + n] if n > 0 else [])


def build_sequences(model: FrozenLlama, prep: dict, *, gen_tokens: int = 48, harmful_answers: bool = True,
                    batch_size: int = 64, log=print) -> list[JointSeq]:
    """The training sequences (table in the module docstring); generation runs on the model's device."""
    eog = set(prep["eog"])
    train = prep["train"]
    want = [e for e in train if e["label"] == 0 or harmful_answers or e["prefill"]]
    log(f"generating the base model's own answers for {len(want)} prompts ({gen_tokens} tokens max)")
    answers = generate(model, [e["tokens"] for e in want], gen_tokens, eog, batch_size=batch_size,
                       n_vocab=prep["n_vocab"])
    seqs = []
    for e, ans in zip(want, answers):
        n = len(e["tokens"])
        benign = e["label"] == 0
        seqs.append(JointSeq(e["tokens"] + ans, [n] + _inside(n, ans, eog), e["label"],
                             lm_from=n if benign else None, meta={"id": e["id"], "kind": "answer"}))
    for e in train:
        if e["label"] == 1 and not e["prefill"]:
            n = len(e["tokens"])
            seqs.append(JointSeq(e["tokens"] + prep["refusal"], [n], 1, lm_from=n,
                                 meta={"id": e["id"], "kind": "refusal"}))
    return seqs


def save_sequences(seqs: list[JointSeq], path: Path) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump([[s.tokens, s.cls_at, s.label, s.lm_from, s.meta] for s in seqs], f, separators=(",", ":"))


def load_sequences(path: Path) -> list[JointSeq]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [JointSeq(t, c, lab, lm, m) for t, c, lab, lm, m in json.load(f)]
