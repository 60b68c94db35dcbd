"""llama.cpp backend on llama-cpp-python's low-level (ctypes) API.

Per check step one decode holds two positions, `[token at n, [CLS] at n+1]`, with logits
for both rows; row 0 feeds the sampler, row 1 gives the verdict, then the [CLS] cell is
removed from the KV cache so the next token takes position n+1 (docs/design.md section 3).

A windowed check (runtime/window.py) puts the window's cells in a second sequence too
(`llama_memory_seq_cp`: with the unified KV cache the context is made with, a metadata change), decodes
the side tokens and [CLS] in that sequence right after the window, reads the verdict and removes the
sequence. The token of that step is decoded on its own before (llama.cpp refuses a batch whose token
belongs to two sequences that differ), so a windowed check step is two decodes; the check's decode
replaces the token's logits, so the next token is drawn from them before it (the sampler sees the same
calls in the same order) and a copy of the row is kept for `hesitation`.
"""
from __future__ import annotations

import ctypes
import math
import os

import llama_cpp as ll

from ..errors import ModelFileError
from .base import Sampling, TokensFromFile, category_probs, check_prompt, logprob_py, side_tokens
from .llama_file import LlamaModelFile, _FreedOnDelete, init_llama, llama_errors  # noqa: F401 (the module's API)
from .llama_sampler import grammar_sampler, sampler_chain
from ..window import cls_position

try:  # the native module built from cpp_ext/ by pip install
    import runtime._native as _native  # the compiled module itself, not the package API
except ImportError:  # pragma: no cover - only when the package was not installed with pip
    _native = None

MAX_SCORED_ROWS = 64  # logits rows one decode asks for when scoring a prompt (each row is n_vocab floats)


def p_unsafe_from_logits(row, safe_id: int, unsafe_id: int) -> float:
    """softmax([safe, unsafe])[1] of a logits row (pure-Python reference of the native one)."""
    d = float(row[unsafe_id]) - float(row[safe_id])
    if d != d:
        return float("nan")
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def row_stats_py(row, n_vocab: int, excluded=()) -> tuple[float, float]:
    """(entropy, top-2 margin) of softmax(row) without the excluded ids (reference of the native one)."""
    import numpy as np

    x = np.ctypeslib.as_array(row, shape=(n_vocab,)).astype(np.float64) if not isinstance(row, np.ndarray) \
        else row.astype(np.float64)
    x = np.delete(x, [i for i in excluded if 0 <= i < n_vocab])
    d = x - x.max()
    e = np.exp(d)
    z = e.sum()
    top2 = np.sort(d)[-2] if len(d) > 1 else -np.inf
    return float(np.log(z) - (e * d).sum() / z), float((1.0 - np.exp(top2)) / z)


class LlamaBackend(TokensFromFile, _FreedOnDelete):
    """One llama.cpp context (one KV cache, one sampler chain) implementing `Backend`."""

    def __init__(self, mf: LlamaModelFile, n_ctx: int = 4096, threads: int | None = None,
                 n_batch: int = 512, safety_ids: tuple[int, int, int] | None = None, reuse_prefix: bool = False,
                 category_ids: tuple[int, ...] = (), embeddings: bool = False):
        self.mf = mf
        self.reuse_prefix = reuse_prefix  # start() keeps the cached prefix shared with the last conversation
        threads = threads or max(1, min(os.cpu_count() or 1, 8))
        self.threads = threads
        p = ll.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_batch
        p.n_threads = p.n_threads_batch = threads
        p.n_seq_max = 2  # sequence 1: a windowed check's cells (one cache for both: seq_cp copies no data)
        p.kv_unified = True
        p.no_perf = True
        if embeddings:  # the final normed hidden state of each output row too (`cls_hidden`); no pooling
            p.embeddings = True
            p.pooling_type = ll.LLAMA_POOLING_TYPE_NONE
        self.ctx = ll.llama_init_from_model(mf.model, p)
        if not self.ctx:
            raise ModelFileError(f"llama.cpp could not create a context for {mf.path} (n_ctx={n_ctx})")
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        self.n_batch = n_batch
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        self.safety_ids = safety_ids  # (*side, cls, safe, unsafe) or None
        self.side = side_tokens(safety_ids) if safety_ids else []  # what a check decodes
        self.category_ids = tuple(category_ids)  # (*categories, controversial) read at a check, or ()
        self._categories = None  # category_probs of the last check computed here
        self.sampler = None
        self.n_past = 0
        self._row = -1  # batch row holding the logits of the last real token
        self._cells: list[int] | None = None  # the tokens in cache cells 0..n-1 (None: unknown)
        self._lp: dict[int, float] = {}  # position -> log p of the token there, for the cells in `_cells`
        self._score: list[int] = []  # the positions the last `start` scored
        self._next: int | None = None  # drawn before a windowed check replaced the logits it came from
        self._saved = None  # a copy of those logits (numpy), for `hesitation`

    # -- decoding --------------------------------------------------------------------
    def _decode(self, tokens: list[int], start_pos: int, want_last: bool, cls: bool, rows=(), seq: int = 0) -> None:
        """Decode tokens at start_pos.. (+ the side tokens ending in [CLS] right after them) in sequence `seq`;
        logits for the last token (and the [CLS]), and for the tokens at the indices `rows` (batch rows)."""
        b = self.batch
        items = list(tokens) + (self.side if cls else [])
        for i, t in enumerate(items):
            b.token[i] = t
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 0
        for r in rows:
            b.logits[r] = 1
        if want_last and tokens:
            b.logits[len(tokens) - 1] = 1
        if cls:
            b.logits[len(items) - 1] = 1
        b.n_tokens = len(items)
        if want_last and tokens:
            self._next = self._saved = None
        rc = ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        if want_last and tokens:
            self._row = len(tokens) - 1

    def _verdict(self, row: int) -> float:
        logits = ll.llama_get_logits_ith(self.ctx, row)
        safe, unsafe = self.safety_ids[-2:]
        if not logits:
            self._categories = None
            return float("nan")
        if self.category_ids:
            self._categories = category_probs(logits, self.category_ids)
        if _native is not None:
            return _native.p_unsafe(ctypes.addressof(logits.contents), safe, unsafe)
        return p_unsafe_from_logits(logits, safe, unsafe)

    def _drop_cls(self, pos: int) -> None:
        if not ll.llama_memory_seq_rm(self.mem, 0, pos, -1):
            raise RuntimeError("could not remove the [CLS] cells from the KV cache")

    def _with_cls(self, tokens: list[int], start: int, want_last: bool) -> float:
        self._decode(tokens, start, want_last, cls=True)
        p = self._verdict(len(tokens) + len(self.side) - 1)
        self._drop_cls(start + len(tokens))
        return p

    def _logprob(self, row: int, token: int) -> float:
        """log p(token) from the logits of batch row `row` (the ids never sampled left out); NaN without logits."""
        logits = ll.llama_get_logits_ith(self.ctx, row)
        if not logits:
            return float("nan")
        if _native is not None and hasattr(_native, "logprob"):
            return _native.logprob(ctypes.addressof(logits.contents), self.mf.n_vocab, self.masked_ids, token)
        return logprob_py(logits, self.mf.n_vocab, self.masked_ids, token)

    def prompt_logprobs(self) -> list[float]:
        return [self._lp.get(p, float("nan")) for p in self._score]

    def start(self, tokens: list[int], sampling: Sampling, check: bool, reuse: bool | None = None,
              score: list[int] = ()) -> float | None:
        """Decode a prompt (with the side [CLS] after it when check); the next `sample` continues it.

        reuse=True keeps the cache cells of the longest prefix shared with what the previous
        start/advance/verdicts left there (short of the last token, whose logits are needed):
        many prompts sharing a chat or jailbreak template skip it. The kept cells were computed
        in other batches, so logits may differ from a fresh start in the last bits of rounding.
        reuse=None: the backend's `reuse_prefix` (a chat's next turn re-decodes only what is new).
        score: positions whose token's log-probability `prompt_logprobs` then gives (the logits rows before
        them are requested in the prefill; a kept prefix's are remembered from the pass that computed them).
        """
        reuse = self.reuse_prefix if reuse is None else reuse
        self._make_sampler(sampling)
        row = self._prefill(tokens, reuse, check, score)
        p = None
        if check:
            p = self._verdict(row)
            self._drop_cls(len(tokens))
        self.n_past = len(tokens)
        self._cells = list(tokens)
        return p

    def _prefill(self, tokens: list[int], reuse: bool, check: bool, score=()) -> int:
        """Decode tokens in chunks (keeping the cells of the prefix shared with the previous pass when
        reuse), the side tokens ending in [CLS] after the last chunk when check (their cells stay for the
        caller to read and drop). Returns the batch row of that [CLS] (check) or of the last token.
        `score`: positions whose token's log-probability to keep (at most MAX_SCORED_ROWS rows per decode)."""
        check_prompt(tokens, self.n_ctx, check, self.safety_ids, score)
        limit = len(tokens) - 1 if reuse else 0
        shared = self._shared(tokens, limit)
        todo = [p for p in score if not (p < shared and p in self._lp)]  # the kept prefix's scores are known
        if todo:
            limit = min(limit, todo[0] - 1)  # the row before the first unknown one is decoded again
        known = {p: v for p, v in self._lp.items() if p < shared}  # true for these tokens, though cells may go
        done = self._keep_prefix(tokens, limit)
        self._lp = known
        self.reused = done  # prompt tokens whose cache cells were kept (not decoded again)
        self._score = list(score)
        rows = [p - 1 for p in todo]
        chunk = self.n_batch - max(1, len(self.side))  # room for the side tokens in the last chunk
        s, k = done, 0
        while s < len(tokens):
            e = min(s + chunk, len(tokens))
            while k < len(rows) and rows[k] < s:
                k += 1
            mine = [r for r in rows[k:k + MAX_SCORED_ROWS] if r < e]
            if len(mine) == MAX_SCORED_ROWS:
                e = mine[-1] + 1
            part, final = tokens[s:e], e == len(tokens)
            self._decode(part, s, want_last=final, cls=final and check, rows=[r - s for r in mine])
            for r in mine:
                self._lp[r + 1] = self._logprob(r - s, tokens[r + 1])
            s = e
        return len(part) - 1 + (len(self.side) if check else 0)

    def _shared(self, tokens: list[int], limit: int) -> int:
        """The length of the prefix (at most `limit`) shared with the tokens in the cache cells."""
        done, cells = 0, self._cells or []
        limit = min(limit, len(cells))
        while done < limit and cells[done] == tokens[done]:
            done += 1
        return done

    def _keep_prefix(self, tokens: list[int], limit: int) -> int:
        """Keep the cells of the prefix (at most `limit` long) shared with `_cells`; drop the rest."""
        done = self._shared(tokens, limit)
        self._lp = {p: v for p, v in self._lp.items() if p < done}  # scores of kept cells stay true
        if done:
            if not ll.llama_memory_seq_rm(self.mem, 0, done, -1):
                raise RuntimeError(f"could not cut the KV cache back to {done} shared tokens")
        else:
            ll.llama_memory_clear(self.mem, False)  # metadata only: new tokens overwrite the cells' data
        self._cells = None  # until the caller's pass completes
        return done

    def verdicts(self, tokens: list[int], positions: list[int], reuse: bool = False) -> list[float]:
        """p_unsafe of a [CLS] after tokens[:p] for every p in positions, in one pass over tokens.

        Each stretch up to the next position is decoded with the side [CLS] at its end, which is
        then removed, so the later positions never see an earlier [CLS]. With the same output rows
        as generation (last token + [CLS]) this gives the verdicts the runtime computes when it
        generates those tokens one by one, checking at those positions (training and evaluation).

        reuse=True keeps the cache cells of the longest prefix shared with what the previous
        start/advance/verdicts left there (up to the token before the first position, which is
        decoded again with its [CLS]): scoring many examples sorted by their tokens skips the
        shared chat-template and jailbreak-template prefixes. The kept cells were computed in other
        batches, so verdicts may differ from a fresh pass in the last bits of float rounding.
        """
        if not positions or min(positions) < 1 or max(positions) > len(tokens):
            raise ValueError(f"[CLS] positions must lie in 1..{len(tokens)}, got {positions}")
        check_prompt(tokens[:max(positions)], self.n_ctx, True, self.safety_ids)
        done = self._keep_prefix(tokens, min(positions) - 1 if reuse else 0)
        found, chunk = {}, self.n_batch - len(self.side)
        for p in sorted(set(positions)):
            for s in range(done, p, chunk):
                part = tokens[s:min(s + chunk, p)]
                if s + len(part) == p:
                    found[p] = self._with_cls(part, s, want_last=True)  # the rows generation asks for
                else:
                    self._decode(part, s, want_last=False, cls=False)
            done = p
        self.n_past = done
        self._cells = list(tokens[:done])
        return [found[p] for p in positions]

    def _windowed(self, window, n: int) -> float:
        """The verdict of a check attending to the cells in `window` (half-open ranges, all below n) only."""
        window = [(int(a), int(b)) for a, b in window]
        if not window or any(a < 0 or b < a or b > n for a, b in window):
            raise ValueError(f"a check window must be ranges within 0..{n}, got {window}")
        try:
            for a, b in window:
                if b > a:
                    ll.llama_memory_seq_cp(self.mem, 0, 1, a, b)
            self._decode([], cls_position(window), want_last=False, cls=True, seq=1)
            return self._verdict(len(self.side) - 1)
        finally:
            if not ll.llama_memory_seq_rm(self.mem, 1, -1, -1):
                raise RuntimeError("could not remove a windowed check's cells from the KV cache")

    def advance(self, token: int, check: bool, window=None) -> float | None:
        n = self.n_past
        if check and window is not None:
            import numpy as np
            self.advance(token, False)
            row = ll.llama_get_logits_ith(self.ctx, self._row)
            saved = np.ctypeslib.as_array(row, shape=(self.mf.n_vocab,)).copy() if row else None
            self._next, self._saved = self.sample(), saved  # the check's decode replaces these logits
            return self._windowed(window, n + 1)
        if check:
            p = self._with_cls([token], n, want_last=True)
        else:
            self._decode([token], n, want_last=True, cls=False)
            p = None
        self.n_past = n + 1
        if self._cells is not None:
            self._cells.append(token)
        return p

    def check(self, window=None) -> float:
        if window is not None:
            return self._windowed(window, self.n_past)
        self._decode([], self.n_past, want_last=False, cls=True)
        p = self._verdict(len(self.side) - 1)
        self._drop_cls(self.n_past)
        return p

    def categories(self):
        return self._categories if self.category_ids else None

    @property
    def masked_ids(self) -> tuple[int, ...]:
        """Never sampled: the safety tokens and the category rows."""
        return tuple(self.safety_ids or ()) + self.category_ids

    def hesitation(self) -> tuple[float, float]:
        excluded = self.masked_ids
        if self._saved is not None:  # the row the last token was drawn from, kept across a windowed check
            if _native is not None:
                return _native.row_stats(self._saved.ctypes.data, self.mf.n_vocab, excluded)
            return row_stats_py(self._saved, self.mf.n_vocab, excluded)
        logits = ll.llama_get_logits_ith(self.ctx, self._row)
        if _native is not None:
            return _native.row_stats(ctypes.addressof(logits.contents), self.mf.n_vocab, excluded)
        return row_stats_py(logits, self.mf.n_vocab, excluded)

    def sample(self) -> int:
        if self._next is not None:
            t, self._next = self._next, None
            return t
        return int(ll.llama_sampler_sample(self.sampler, self.ctx, self._row))

    def cls_hidden(self, tokens: list[int], reuse: bool = True):
        """The final normed hidden state (what the safety and category rows read) at the [CLS] of a check
        after `tokens`; needs a backend made with embeddings=True. reuse keeps the cache cells of the prefix
        shared with the previous call (as `start` does: order many prompts so that templates are shared).
        For fitting heads on what the file computes (`train categories`), not the token loop."""
        import numpy as np
        cls_row = self._prefill(tokens, reuse, check=True)
        row = ll.llama_get_embeddings_ith(self.ctx, cls_row)
        if not row:
            raise ModelFileError(f"llama.cpp returned no hidden state for {self.mf.path} (made without embeddings?)")
        out = np.ctypeslib.as_array(row, shape=(ll.llama_model_n_embd(self.mf.model),)).copy()
        self._drop_cls(len(tokens))
        self.n_past, self._cells = len(tokens), list(tokens)
        return out

    def logits_row(self):
        """A copy of the next-token logits at the last real position (n_vocab float32; the safety rows
        included: `masked_ids` names them). For measurements (`bench drift`), not the token loop."""
        import numpy as np
        if self._saved is not None:
            return self._saved.copy()
        logits = ll.llama_get_logits_ith(self.ctx, self._row)
        if not logits:
            raise ModelFileError(f"llama.cpp returned no logits for {self.mf.path}")
        return np.ctypeslib.as_array(logits, shape=(self.mf.n_vocab,)).copy()

    def fused_loop(self, policy, threshold, max_tokens: int, n_prompt: int, streak: int):
        """The token loop in C with the GIL released (cpp_ext/loop.c), after `start`."""
        from .native_loop import FusedLoop
        return FusedLoop(self, policy, threshold, max_tokens, n_prompt, streak)

    def check_grammar(self, grammar: str) -> None:
        """Raise ParameterError unless llama.cpp parses `grammar` (before a generation, not inside it)."""
        ll.llama_sampler_free(grammar_sampler(self.mf.vocab, grammar))

    def _make_sampler(self, s: Sampling) -> None:
        if self.sampler is not None:
            ll.llama_sampler_free(self.sampler)
            self.sampler = None
        self.sampler = sampler_chain(self.mf.vocab, self.mf.n_vocab, self.masked_ids, s)

    def close(self):
        if getattr(self, "sampler", None):
            ll.llama_sampler_free(self.sampler)
            self.sampler = None
        if getattr(self, "batch", None) is not None:
            ll.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
            self.ctx = None

