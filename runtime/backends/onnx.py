"""onnxruntime backend over the ONNX export of `python -m safechat.convert.onnx_export` (issue 5).

Same `Backend` interface and the same per-check step as the llama.cpp backend: one call
decodes `[token at n, [CLS] at n+1]` with `logits_index=0`; `logits` (row 0 only) feeds the
sampler and `safety_logits` (the [CLS] row's hidden state against the two head rows only,
no vocabulary projection) gives the verdict. The [CLS]'s key/value row is simply not
written back, so the next token takes position n+1 (docs/design.md section 3).

The KV cache is ours: per layer a preallocated `[1, n_ctx, Hkv, hd]` float32 buffer for
keys and one for values. The graph takes the contiguous view `buf[:, :n]` (bound with
I/O binding, no copy) and returns only the new rows, which are written in place. Nothing
proportional to the cache is copied per step on the CPU provider.

A windowed check (runtime/window.py) runs the side tokens and [CLS] against the window's rows of the cache,
gathered into a short past (the graph's mask lets a row see its whole past; the rows keep the keys computed
at their own positions, and position_ids place the check right after the window). A graph whose family has
sliding-window layers masks by index in that past, not by position: windows are refused there (fail closed).

The ONNX file holds the weights and the `safety.*` metadata; tokenization, detokenization,
end-of-generation and the chat template come from a vocab-only llama.cpp load of the safe
GGUF the model was exported from: `model.gguf` beside `model.onnx` (same stem), the file
named in the ONNX metadata `safechat.vocab_gguf` beside it, or an explicit `gguf=` path.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.contract import PREFIX, SIDE_TOKEN_IDS, SafetyMeta

from ..errors import ContextOverflowError, ModelFileError
from ..window import cls_position
from .base import Sampling, TokensFromFile, category_probs, check_prompt, logprob_py, side_tokens
from .llama import LlamaModelFile, p_unsafe_from_logits, row_stats_py

try:  # the native module built from cpp_ext/ by pip install
    import runtime._native as _native  # the compiled module itself, not the package API
except ImportError:  # pragma: no cover
    _native = None


class VocabFile(LlamaModelFile):
    """A vocab-only llama.cpp load of a GGUF: tokenizer, pieces, EOG, chat template, metadata."""

    def __init__(self, path: str | Path):
        super().__init__(path, vocab_only=True)


def _providers(gpu: bool) -> list[str]:
    import onnxruntime as ort

    if gpu:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelFileError("the CUDA provider was asked for but this onnxruntime has none "
                                 f"(available: {ort.get_available_providers()}); install onnxruntime-gpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModelFile:
    """A loaded ONNX safe model (one InferenceSession) plus the vocabulary of its GGUF."""

    def __init__(self, path: str | Path, gguf: str | Path | None = None, n_gpu_layers: int = 0,
                 threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelFileError("backend='onnx' needs onnxruntime: pip install 'safechat[onnx]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path}")
        self.threads = threads or max(1, min(os.cpu_count() or 1, 8))
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.gpu = bool(n_gpu_layers)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=_providers(self.gpu))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelFileError(f"{self.path} is not a loadable ONNX model: {e}") from None
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.props = props
        self.metadata = {k: v for k, v in props.items() if k.startswith(PREFIX)}
        try:
            self.n_layer = int(props["safechat.n_layer"])
            self.n_head_kv = int(props["safechat.n_head_kv"])
            self.head_dim = int(props["safechat.head_dim"])
            self.n_vocab = int(props["safechat.n_vocab"])
        except (KeyError, ValueError):
            raise ModelFileError(f"{self.path} was not written by safechat.convert.onnx_export "
                                 "(missing safechat.* shape metadata)") from None
        self.vocab_file = VocabFile(self._find_gguf(gguf, props))
        if self.vocab_file.n_vocab != self.n_vocab:
            raise ModelFileError(f"{self.vocab_file.path} has {self.vocab_file.n_vocab} tokens but {self.path} "
                                 f"has {self.n_vocab}: not the GGUF it was exported from")
        theirs = {k: v for k, v in self.vocab_file.metadata.items()
                  if k in (PREFIX + "cls_token_id", PREFIX + "safe_token_id", PREFIX + "unsafe_token_id",
                           PREFIX + SIDE_TOKEN_IDS)}
        mine = {k: self.metadata.get(k) for k in theirs}
        if theirs != mine:
            raise ModelFileError(f"safety token ids differ between {self.path} and {self.vocab_file.path}")
        self.chat_template = props.get("tokenizer.chat_template") or self.vocab_file.chat_template
        self.add_bos, self.bos = self.vocab_file.add_bos, self.vocab_file.bos

    def _find_gguf(self, gguf, props) -> Path:
        if gguf is not None:
            return Path(gguf)
        tried = [self.path.with_suffix(".gguf")]
        if props.get("safechat.vocab_gguf"):
            tried.append(self.path.parent / props["safechat.vocab_gguf"])
        for p in tried:
            if p.is_file():
                return p
        raise ModelFileError(f"the ONNX backend tokenizes with the safe GGUF it was exported from; "
                             f"none found (tried {', '.join(map(str, tried))}): put it beside {self.path.name}")

    def safety_meta(self) -> SafetyMeta:
        return SafetyMeta.from_kv(self.metadata, self.n_vocab, where=str(self.path))

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.vocab_file.tokenize(text, special)

    def special_texts(self):
        return self.vocab_file.special_texts()

    def token_bytes(self, token: int) -> bytes:
        return self.vocab_file.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return self.vocab_file.is_eog(token)

    def close(self):
        if getattr(self, "vocab_file", None) is not None:
            self.vocab_file.close()
        self.session = None


class OnnxBackend(TokensFromFile):
    """One KV cache (numpy, preallocated) and one numpy sampler implementing `Backend`."""

    def __init__(self, mf: OnnxModelFile, n_ctx: int = 4096, threads: int | None = None,
                 safety_ids: tuple[int, int, int] | None = None, category_ids: tuple[int, ...] = ()):
        self.mf = mf
        self.sess = mf.session
        self.threads = mf.threads
        self.n_ctx = int(n_ctx)
        self.safety_ids = safety_ids  # (*side, cls, safe, unsafe) or None
        self.side = side_tokens(safety_ids) if safety_ids else []  # what a check decodes
        L = mf.n_layer
        shape = (1, self.n_ctx, mf.n_head_kv, mf.head_dim)
        self.cache = [np.zeros(shape, np.float32) for _ in range(2 * L)]  # calloc: pages on first touch
        self.past_names = [f"past_{kind}_{i}" for i in range(L) for kind in ("key", "value")]
        self.out_names = ["logits", "safety_logits"] + [f"{kind}_{i}" for i in range(L) for kind in ("key", "value")]
        self.n_past = 0
        self._logits: np.ndarray | None = None
        self._sampling = Sampling()
        self._rng = np.random.default_rng(0)
        self._history: list[int] = []
        self._lps: list[float] = []  # log p of the tokens the last `start` scored
        self.category_ids = tuple(category_ids)  # (*categories, controversial): safety_logits[2:], or ()
        self._categories = None
        self._mask = np.array(sorted(set(safety_ids or ()) | set(self.category_ids)), dtype=np.int64)

    # -- decoding --------------------------------------------------------------------
    def _run(self, tokens: list[int], start: int, keep: int, logits_row: int, past=None):
        """Decode `tokens` at positions start..; write the first `keep` new K/V rows into the cache.
        `past`: per cache buffer, the rows to attend to instead of the first `start` (then nothing is kept)."""
        T = len(tokens)
        if start + T > self.n_ctx:
            raise ContextOverflowError(f"position {start + T} is beyond the context of {self.n_ctx}")
        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        io.bind_cpu_input("position_ids", np.arange(start, start + T, dtype=np.int64)[None])
        io.bind_cpu_input("logits_index", np.asarray([logits_row], dtype=np.int64))
        for name, buf in zip(self.past_names, past if past is not None else self.cache):
            # a contiguous view of the first `start` rows (or the gathered past), bound by pointer: no copy
            rows = buf.shape[1] if past is not None else start
            io.bind_input(name, "cpu", 0, np.float32, [1, rows, buf.shape[2], buf.shape[3]], buf.ctypes.data)
        for name in self.out_names:
            io.bind_output(name, "cpu")
        self.sess.run_with_iobinding(io)
        outs = io.copy_outputs_to_cpu()
        if keep:
            for buf, new in zip(self.cache, outs[2:]):
                buf[:, start:start + keep] = new[:, :keep]
        return outs[0][0], outs[1][0]

    def start(self, tokens: list[int], sampling: Sampling, check: bool, score: list[int] = ()) -> float | None:
        """Prefill (+ the side [CLS] when check). `score`: the graph returns one logits row per run, so the
        prefill is cut after each row a scored token needs (the cache carries over: no token is decoded twice)."""
        check_prompt(tokens, self.n_ctx, check, self.safety_ids, score)
        self._sampling = sampling
        self._rng = np.random.default_rng(sampling.seed & 0xFFFFFFFF)
        self._history = []
        self._lps, s = [], 0
        for p in score:  # tokens[s:p] with the logits of row p-1: log p(tokens[p] | tokens[:p])
            logits, _ = self._run(list(tokens[s:p]), s, keep=p - s, logits_row=p - 1 - s)
            self._lps.append(self._logprob(logits, tokens[p]))
            s = p
        items = list(tokens[s:]) + (self.side if check else [])
        logits, safety = self._run(items, s, keep=len(tokens) - s, logits_row=len(tokens) - 1 - s)
        self._logits = logits
        self.n_past = len(tokens)
        return self._verdict(safety) if check else None

    def _logprob(self, row: np.ndarray, token: int) -> float:
        excluded = tuple(int(i) for i in self._mask)
        if _native is not None and hasattr(_native, "logprob") and row.dtype == np.float32 and row.flags.c_contiguous:
            return _native.logprob(row.ctypes.data, row.shape[0], excluded, token)
        return logprob_py(row, row.shape[0], excluded, token)

    def prompt_logprobs(self) -> list[float]:
        return list(self._lps)

    def _verdict(self, safety: np.ndarray) -> float:
        """p_unsafe from safety_logits (and the category scores from its other rows, kept for `categories`)."""
        if self.category_ids:
            self._categories = category_probs(safety, range(2, 2 + len(self.category_ids))) \
                if len(safety) == 2 + len(self.category_ids) else None
        return p_unsafe_from_logits(safety, 0, 1)

    def categories(self):
        return self._categories if self.category_ids else None

    def _windowed(self, window, n: int) -> float:
        """The verdict of a check attending to the cache rows in `window` (half-open ranges below n) only."""
        window = [(int(a), int(b)) for a, b in window]
        if not window or any(a < 0 or b < a or b > n for a, b in window):
            raise ValueError(f"a check window must be ranges within 0..{n}, got {window}")
        vf = self.mf.vocab_file
        arch = vf.architecture or ""
        if vf.meta_value(f"{arch}.attention.sliding_window"):
            raise ModelFileError(f"windowed checks on ONNX need a family without sliding-window layers ({arch} has "
                                 "them): use the llama backend")
        idx = np.concatenate([np.arange(a, b) for a, b in window])
        past = [np.ascontiguousarray(buf[:, idx]) for buf in self.cache]
        _, safety = self._run(self.side, cls_position(window), keep=0, logits_row=0, past=past)
        return self._verdict(safety)

    def advance(self, token: int, check: bool, window=None) -> float | None:
        n = self.n_past
        if check and window is not None:
            self.advance(token, False)
            return self._windowed(window, n + 1)
        items = [token] + (self.side if check else [])
        logits, safety = self._run(items, n, keep=1, logits_row=0)
        self._logits = logits
        self.n_past = n + 1
        return self._verdict(safety) if check else None

    def check(self, window=None) -> float:
        if window is not None:
            return self._windowed(window, self.n_past)
        # the side tokens alone: a logits row is computed (one projection) but not kept
        _, safety = self._run(self.side, self.n_past, keep=0, logits_row=0)
        return self._verdict(safety)

    def hesitation(self) -> tuple[float, float]:
        row = self._logits
        excluded = tuple(int(i) for i in self._mask)
        if _native is not None and row.dtype == np.float32 and row.flags.c_contiguous:
            return _native.row_stats(row.ctypes.data, row.shape[0], excluded)
        return row_stats_py(row, row.shape[0], excluded)

    def sample(self) -> int:
        s = self._sampling
        x = self._logits.astype(np.float64)
        if len(self._mask):
            x[self._mask] = -np.inf
        if s.repeat_penalty != 1.0 and self._history:
            recent = np.unique(np.asarray(self._history[-s.repeat_last_n:], dtype=np.int64))
            v = x[recent]
            x[recent] = np.where(v > 0, v / s.repeat_penalty, v * s.repeat_penalty)
        if s.greedy:
            tok = int(np.argmax(x))
        else:  # llama.cpp's chain order: top-k, top-p, min-p, temperature, draw
            idx = np.argsort(-x, kind="stable")
            if s.top_k > 0:
                idx = idx[:s.top_k]
            z = x[idx]
            p = np.exp(z - z[0])
            p /= p.sum()
            if s.top_p < 1.0:
                n = int(np.searchsorted(np.cumsum(p), s.top_p)) + 1
                idx, z, p = idx[:n], z[:n], p[:n]
            if s.min_p > 0.0:
                keep = p >= s.min_p * p[0]
                keep[0] = True
                idx, z = idx[keep], z[keep]
            z = z / s.temperature
            q = np.exp(z - z.max())
            q /= q.sum()
            tok = int(idx[self._rng.choice(len(idx), p=q)])
        self._history.append(tok)
        return tok

    def close(self):
        self.cache = []
        self._logits = None


def load_onnx(path: str | Path, gguf: str | Path | None = None, n_ctx: int = 4096, n_gpu_layers: int = 0,
              threads: int | None = None) -> tuple[OnnxModelFile, OnnxBackend]:
    """The file and a backend for it (what `runtime.load(path, backend="onnx")` uses)."""
    mf = OnnxModelFile(path, gguf=gguf, n_gpu_layers=n_gpu_layers, threads=threads)
    meta = None
    try:
        meta = mf.safety_meta()
    except ValueError:
        pass
    return mf, OnnxBackend(mf, n_ctx=n_ctx, safety_ids=meta.token_ids if meta else None,
                           category_ids=meta.category_ids if meta else ())


__all__ = ["OnnxBackend", "OnnxModelFile", "VocabFile", "load_onnx"]
