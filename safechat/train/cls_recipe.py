"""The frozen-LM `cls` recipe (docs/design.md section 4): learn the [CLS] input row and two head rows.

Strategic attention makes this cheap: nothing attends to [CLS], so the context's keys and
values do not depend on it. Each training sequence is run through the frozen model once
(no grad) and its keys/values are cached on disk; then [CLS] query positions (end of the
prompt or prefill, and points inside benign responses) are trained against that cache.
Only the [CLS] forward pass (one position, 30 layers) is differentiated.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.contract import MAX_CHECK_TOKENS
from runtime.prompt import build_prompt, prompt_tokens

from safechat.convert.llama_torch import FrozenLlama

RESPONSE_POINTS = (8, 24, 48)  # [CLS] after this many tokens of a benign reference response


@dataclass
class Encoded:
    tokens: list[int]
    positions: list[int]  # [CLS] goes right after tokens[:p]
    label: int
    meta: dict


def encode(example: dict, vocab, template: str | None, bos: int | None = None) -> Encoded:
    """Token ids exactly as the runtime builds them (`vocab`: the model file, `runtime.prompt.prompt_tokens`),
    plus the [CLS] positions to train/evaluate."""
    msgs = [{"role": "user", "content": example["prompt"]}]
    if example.get("prefill"):
        msgs.append({"role": "assistant", "content": example["prefill"]})
    toks = prompt_tokens(build_prompt(template, msgs), vocab, bos)
    positions = [len(toks)]
    if example.get("response") and not example.get("prefill"):
        resp = vocab.tokenize(example["response"], False)[:max(RESPONSE_POINTS)]
        positions += [len(toks) + k for k in RESPONSE_POINTS if k <= len(resp)]
        toks = toks + resp
    return Encoded(toks, positions, int(example["label"]), example)


MIN_SHARED = 8  # a sequence reuses another's keys/values when they share at least this many first tokens


def shared_prefixes(seqs: list[list[int]], min_shared: int = MIN_SHARED) -> list[tuple[int | None, int]]:
    """For each sequence, (index of an earlier one it shares its first n tokens with, n), or (None, 0).

    Sequences are ranked by their tokens; the longest prefix a sequence shares with any lower-ranked
    one is the one it shares with its predecessor, and the source is the lowest-ranked sequence that
    shares it. A source's own shared prefix is strictly shorter, so chains of sources are short (one
    link per nesting level: chat template, jailbreak template, prompt) and can be computed in waves.
    Indices are into `seqs`; a source always sorts before the sequence that reads from it.
    """
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    lcp = [0] * len(order)  # lcp[r]: first tokens shared by ranks r-1 and r
    for r in range(1, len(order)):
        a, b = seqs[order[r - 1]], seqs[order[r]]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        lcp[r] = n
    out: list[tuple[int | None, int]] = [(None, 0)] * len(seqs)
    below = [0]  # ranks with increasing lcp: the nearest earlier rank sharing fewer tokens than r is on top
    for r in range(1, len(order)):
        while lcp[below[-1]] >= lcp[r] > 0:  # lcp[0] = 0 stays at the bottom
            below.pop()
        n = min(lcp[r], len(seqs[order[r]]) - 1)  # at least one new token to compute
        if n >= min_shared:  # ranks below[-1] .. r share lcp[r] tokens: the lowest is the source
            out[order[r]] = (order[below[-1]], n)
        below.append(r)
    return out


def _row_index(spans: list[tuple[int, int]], width: int) -> np.ndarray:
    """Flat indices of stored rows [start, start + n) for each (start, n), each padded to `width` with row 0."""
    rows = np.zeros((len(spans), width), dtype=np.int64)
    for j, (start, n) in enumerate(spans):
        rows[j, :n] = np.arange(start, start + n)
    return rows.reshape(-1)


@torch.no_grad()
def _extend(model: FrozenLlama, new: list[list[int]], past: list[tuple[int, int]], data: np.ndarray) -> torch.Tensor:
    """Keys/values of each `new` token run continuing a prefix whose keys/values are the stored rows
    data[start:start + n] for its (start, n) in `past` (n = 0: no prefix). Returns (B, S, layer, 2, H, D)."""
    c = model.cfg
    B, S, P = len(new), max(map(len, new)), max(n for _, n in past)
    toks = torch.zeros(B, S, dtype=torch.long)
    for j, t in enumerate(new):
        toks[j, :len(t)] = torch.tensor(t)
    pos = torch.tensor([n for _, n in past]).view(B, 1) + torch.arange(S).view(1, S)
    if P == 0:
        kv, _ = model.prefill(toks)  # (layer, 2, B, S, H, D)
        return kv.permute(2, 3, 0, 1, 4, 5)
    pkv = torch.from_numpy(data[_row_index(past, P)].astype(np.float32))
    pkv = pkv.view(B, P, c.n_layer, 2, c.n_head_kv, c.head_dim)
    cached = [(pkv[:, :, i, 0], pkv[:, :, i, 1]) for i in range(c.n_layer)]
    seen = torch.arange(P).view(1, P) < torch.tensor([n for _, n in past]).view(B, 1)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = torch.cat([seen.view(B, 1, 1, P).expand(B, 1, S, P), causal.expand(B, 1, S, S)], -1)
    _, kv = model.forward(model.embed(toks), pos, mask, past=cached, keep_kv=True)
    return torch.stack([torch.stack([k[:, P:], v[:, P:]], 2) for k, v in kv], 2)  # (B, S, layer, 2, H, D)


def _prefill_batches(lengths: list[int], source: list[tuple[int | None, int]], max_tokens: int) -> list[list[int]]:
    """Batches of sequence indices to compute, each sequence after its source (`shared_prefixes`).

    Waves by depth (a source is computed in an earlier wave); inside a wave, batches of similar
    new-token counts under a token budget, and a budget on the prefix rows each batch reads back.
    """
    depth = [0] * len(lengths)
    for k in sorted(range(len(lengths)), key=lambda k: (source[k][0] is not None, source[k][1])):
        depth[k] = 0 if source[k][0] is None else depth[source[k][0]] + 1  # a source shares fewer tokens
    n_new = [n - shared for n, (_, shared) in zip(lengths, source)]
    full = lambda b, k: ((len(b) + 1) * n_new[k] > max_tokens or n_new[k] > 1.5 * n_new[b[0]] + 8  # noqa: E731
                         or (len(b) + 1) * max(source[j][1] for j in b + [k]) > 2 * max_tokens)
    return [batch for d in range(max(depth, default=0) + 1)
            for batch in pack_batches(sorted((k for k in range(len(lengths)) if depth[k] == d),
                                             key=lambda k: n_new[k]), full)]


class KVCache:
    """Keys/values of every training sequence, token-major fp16 on disk: (tokens, layer, k/v, head, dim).

    A sequence that is a prefix of another (a prompt and the same prompt with the model's own
    answer, exact duplicates) is not stored twice: causal attention makes its keys/values the first
    rows of the longer one's, so it reads those. A prefix several sequences share (chat template,
    jailbreak template, a prompt with and without a suffix or prefill) is computed once: the others
    copy its stored rows and continue from them (`shared_prefixes`, `_extend`), reading it in fp16
    as llama.cpp's F16 cache does.
    """

    def __init__(self, model: FrozenLlama, seqs: list[list[int]], path: Path, max_batch_tokens: int = 4096):
        c = model.cfg
        home = list(range(len(seqs)))  # the stored sequence whose first rows hold each one's keys/values
        by_tokens = sorted(range(len(seqs)), key=lambda i: seqs[i])
        for i, j in reversed(list(zip(by_tokens, by_tokens[1:]))):  # a prefix sorts right before an extension
            if seqs[j][:len(seqs[i])] == seqs[i]:
                home[i] = home[j]
        stored = sorted(set(home))
        offsets = np.cumsum([0] + [len(seqs[i]) for i in stored]).tolist()
        at = dict(zip(stored, offsets))
        self.start = [at[home[i]] for i in range(len(seqs))]
        self.n_tokens = offsets[-1]
        shape = (self.n_tokens, c.n_layer, 2, c.n_head_kv, c.head_dim)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(json.dumps([shape, [list(map(int, s)) for s in seqs]]).encode()).hexdigest()
        stamp = path.with_suffix(".key")
        if path.is_file() and stamp.is_file() and stamp.read_text() == key:  # reuse a finished cache
            self.data = np.load(path, mmap_mode="r")
            return
        stamp.unlink(missing_ok=True)
        self.data = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        source = shared_prefixes([seqs[i] for i in stored])
        batches = _prefill_batches([len(seqs[i]) for i in stored], source, max_batch_tokens)
        for b in tqdm(batches, desc="prefill (frozen model, keys/values)", unit="batch", mininterval=10):
            new = [seqs[stored[k]][source[k][1]:] for k in b]
            past = [(at[stored[source[k][0]]], source[k][1]) if source[k][0] is not None else (0, 0) for k in b]
            for k, (start, n) in zip(b, past):  # the shared prefix: the source's rows, as they are
                self.data[at[stored[k]]:at[stored[k]] + n] = self.data[start:start + n]
            kv = _extend(model, new, past, self.data).to(torch.float16).numpy()  # (B, S, layer, 2, H, D)
            for j, (k, (_, n)) in enumerate(zip(b, past)):
                self.data[at[stored[k]] + n:at[stored[k]] + n + len(new[j])] = kv[j, :len(new[j])]
        self.data.flush()
        stamp.write_text(key)

    def gather(self, seq_idx: list[int], ctx_len: list[int], n_layers: int | None = None) -> torch.Tensor:
        """Padded context keys/values for queries: (layer, 2, Q, L, H, D) float32 (the first n_layers)."""
        L = max(ctx_len)
        rows = _row_index([(self.start[i], n) for i, n in zip(seq_idx, ctx_len)], L)
        kv = torch.from_numpy(self.data[rows, :n_layers])
        kv = kv.view(len(seq_idx), L, *kv.shape[1:]).permute(2, 3, 0, 4, 1, 5)  # (layer, 2, Q, H, L, D) fp16
        out = torch.empty(kv.shape, dtype=torch.float32).copy_(kv)  # one pass: to float32, laid out per head
        return out.transpose(3, 4)


def pack_batches(items, full) -> list[list]:
    """Consecutive runs of `items`: a new batch starts when `full(batch, next_item)` says it must."""
    batches, cur = [], []
    for x in items:
        if cur and full(cur, x):
            batches.append(cur)
            cur = []
        cur.append(x)
    if cur:
        batches.append(cur)
    return batches


def _query_batches(queries, max_tokens: int, rng: random.Random):
    batches = pack_batches(sorted(queries, key=lambda q: q[1]), lambda b, q: (len(b) + 1) * q[1] > max_tokens)
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def score_cached(model: FrozenLlama, cache: KVCache, encoded: list[Encoded], cls_row: torch.Tensor,
                 head: torch.Tensor, max_batch_tokens: int = 8192, read_layer: int | None = None) -> list[list[float]]:
    """p_unsafe at every [CLS] position, from the torch model against cached keys/values
    (read after `read_layer` layers: `FrozenLlama.cls_forward`)."""
    queries = [(i, p, j) for i, e in enumerate(encoded) for j, p in enumerate(e.positions)]
    out = [[0.0] * len(e.positions) for e in encoded]
    for batch in _query_batches(queries, max_batch_tokens, random.Random(0)):
        idx, ctx, slot = zip(*batch)
        hid = model.cls_forward(cls_row, cache.gather(list(idx), list(ctx), read_layer), torch.tensor(ctx))
        p = torch.softmax(hid @ head.T, -1)[:, 1].tolist()
        for i, j, v in zip(idx, slot, p):
            out[i][j] = v
    return out


def _drop(cache_path: Path) -> None:
    cache_path.unlink(missing_ok=True)
    cache_path.with_suffix(".key").unlink(missing_ok=True)


def train_cls(model: FrozenLlama, encoded: list[Encoded], cache_path: Path, *, epochs: int = 4,
              lr: float = 3e-3, seed: int = 0, max_batch_tokens: int = 6144, keep_cache: bool = False,
              val: list[Encoded] | None = None, side_tokens: int = 1, read_layer: int | None = None,
              log=print):
    """Train the [CLS] row and head rows; return (cls_row (D,), head (2, D), info) (float32 numpy).

    With side_tokens K > 1, K chained side rows are learned (a soft prompt whose last row is the
    [CLS]; `FrozenLlama.cls_forward`) and cls_row is (K, D). With read_layer L, the head reads the
    [CLS] after the first L layers (a measurement; model files read the last layer).

    With `val`, the validation [CLS] positions are scored after every epoch (torch, against
    their own cached keys/values) and the epoch with the best validation AUROC is returned.
    """
    if not 1 <= side_tokens <= MAX_CHECK_TOKENS:
        raise ValueError(f"side_tokens must be in 1..{MAX_CHECK_TOKENS}, got {side_tokens}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.time()
    cache = KVCache(model, [e.tokens for e in encoded], cache_path)
    log(f"cached keys/values for {len(encoded)} sequences, {cache.n_tokens} tokens stored in {time.time() - t0:.0f}s")
    val_path = cache_path.with_name(cache_path.stem + "-val.npy")
    val_cache = KVCache(model, [e.tokens for e in val], val_path) if val else None
    val_labels = np.array([e.label for e in val for _ in e.positions]) if val else None
    queries = [(i, p, e.label) for i, e in enumerate(encoded) for p in e.positions]
    n_pos = sum(q[2] for q in queries)
    w_pos = len(queries) / (2.0 * max(n_pos, 1))
    w_neg = len(queries) / (2.0 * max(len(queries) - n_pos, 1))
    emb = model.w["token_embd.weight"]
    cls_row = emb.mean(0) + 0.01 * torch.randn(side_tokens, emb.shape[1])
    cls_row = (cls_row[0] if side_tokens == 1 else cls_row).requires_grad_(True)
    head = torch.zeros(2, emb.shape[1], requires_grad=True)
    opt = torch.optim.Adam([{"params": [cls_row], "lr": lr}, {"params": [head], "lr": lr * 3}])
    steps = epochs * len(_query_batches(queries, max_batch_tokens, random.Random(0)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * 3], total_steps=steps, pct_start=0.1)
    best = (-1.0, None, None, 0)
    for ep in range(epochs):
        tot, n, correct = 0.0, 0, 0
        for batch in tqdm(_query_batches(queries, max_batch_tokens, rng), desc=f"epoch {ep + 1}/{epochs}",
                          mininterval=10):
            idx, ctx, lab = zip(*batch)
            kv = cache.gather(list(idx), list(ctx), read_layer)
            hid = model.cls_forward(cls_row, kv, torch.tensor(ctx))
            logits = hid @ head.T
            y = torch.tensor(lab)
            w = torch.where(y == 1, w_pos, w_neg)
            loss = (F.cross_entropy(logits, y, reduction="none") * w).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(batch)
            n += len(batch)
            correct += (logits.argmax(-1) == y).sum().item()
        msg = f"epoch {ep + 1}: loss {tot / n:.4f} train acc {correct / n:.3f}"
        if val_cache is not None:
            vs = np.array([p for ps in score_cached(model, val_cache, val, cls_row, head, read_layer=read_layer)
                           for p in ps])
            a = auroc(vs, val_labels)
            msg += f" val AUROC {a:.4f}"
            if a > best[0]:
                best = (a, cls_row.detach().clone(), head.detach().clone(), ep + 1)
        log(msg + f" ({time.time() - t0:.0f}s)")
    if not keep_cache:
        _drop(cache_path)
        _drop(val_path)
    if best[1] is not None:
        log(f"keeping epoch {best[3]} (best validation AUROC {best[0]:.4f})")
        cls_row, head = best[1], best[2]
    info = {"best_epoch": best[3], "best_val_auroc_torch": round(best[0], 4)} if val else {"best_epoch": epochs}
    return cls_row.detach().numpy().astype(np.float32), head.detach().numpy().astype(np.float32), info


# -- evaluation on the converted model file (the real runtime path) ---------------------
def score_gguf(path: Path, encoded: list[Encoded], threads: int | None = None) -> list[list[float]]:
    """p_unsafe at every [CLS] position of every example, computed by llama.cpp on the model file.

    Examples are scored in token order so that each reuses the cache cells of the prefix it shares
    with the one before (chat template, jailbreak template, prompt of a prefill); the results come
    back in the input order.
    """
    from runtime.backends.llama import LlamaBackend, LlamaModelFile

    mf = LlamaModelFile(path)
    meta = mf.safety_meta()
    n_ctx = max(len(e.tokens) for e in encoded) + 8
    be = LlamaBackend(mf, n_ctx=max(512, n_ctx), threads=threads, safety_ids=meta.token_ids)
    out: list[list[float]] = [[] for _ in encoded]
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].tokens)
    for i in tqdm(order, desc=f"score {path.name} (llama.cpp)", mininterval=10):
        out[i] = be.verdicts(encoded[i].tokens, encoded[i].positions, reuse=True)
    be.close()
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    x = np.concatenate([pos, neg])
    order = np.argsort(x, kind="mergesort")
    _, inv, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = np.empty(len(x))
    ranks[order] = ((ends - counts + 1 + ends) / 2.0)[inv]
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def calibrate(scores: np.ndarray, labels: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on benign examples is <= max_fpr."""
    neg = np.sort(scores[labels == 0])
    k = int(math.floor(max_fpr * len(neg)))
    thr = neg[len(neg) - k - 1] if k < len(neg) else 0.0
    return float(min(max(np.nextafter(thr, 1.0), 1e-4), 1 - 1e-4))


def rates(scores: np.ndarray, labels: np.ndarray, thr) -> dict:
    """AUROC and the rates flagged at thr (a number, or one threshold per score)."""
    flag = scores >= thr
    a = auroc(scores, labels)
    out = {"n": int(len(labels)), "auroc": round(a, 4) if a == a else None}
    if (labels == 1).any():
        out["tpr"] = round(float(flag[labels == 1].mean()), 4)
    if (labels == 0).any():
        out["fpr"] = round(float(flag[labels == 0].mean()), 4)
    return out


def metrics_for(held: dict, scored: dict, max_fpr: float, measured_on: str,
                thresholds: tuple[float, float] | None = None) -> tuple[float, dict]:
    """Per split: all [CLS] positions, end of prompt, inside responses, per augmentation.

    The threshold is calibrated on val (at most max_fpr of the benign positions flagged) unless
    `thresholds` gives (prompt threshold, answer threshold): then the end-of-prompt positions are
    flagged at the first, the positions inside responses at the second (`train calibrate`).
    """
    def flat(split):  # (score, label, kind, augmentation) over every [CLS] position; the first is the prompt's
        rows = [(p, e.label, "prompt" if j == 0 else "response", e.meta["augmentation"])
                for e, ps in zip(held[split], scored[split]) for j, p in enumerate(ps)]
        return tuple(np.array(col) for col in zip(*rows))

    if thresholds is None:
        vs, vy, _, _ = flat("val")
        thr = answer = calibrate(vs, vy, max_fpr)
    else:
        thr, answer = thresholds
    metrics = {"threshold": round(thr, 6), "measured_on": measured_on}
    if thresholds is not None:
        metrics["answer_threshold"] = "inf" if math.isinf(answer) else round(answer, 6)  # strict JSON
    for split in held:
        s, y, k, aug = flat(split)
        t = np.where(k == "prompt", thr, answer)
        at = lambda sel: rates(s[sel], y[sel], t[sel])  # noqa: E731
        m = {"all": at(np.ones_like(y, dtype=bool)), "end_of_prompt": at(k == "prompt"),
             "inside_benign_response": at(k == "response")}
        for a in sorted(set(aug)):
            m[f"aug:{a}"] = at((aug == a) & (k == "prompt"))
        metrics[split] = m
    return thr, metrics
