"""A GGUF loaded by llama.cpp (llama-cpp-python's low-level API): weights, vocabulary, safety metadata.

The file a backend's contexts share (`runtime/backends/llama.py` is the context and its token loop),
plus llama.cpp's one-time initialisation with its logging quiet except errors, which are kept for
the messages this package raises (a corrupt file names llama.cpp's own reason).
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import llama_cpp as ll

from runtime.contract import PREFIX, SafetyMeta

from ..errors import ModelFileError
from ..prompt import Special

_init_lock = threading.Lock()
_initialised = False
_log_lines: list[str] = []


@ll.llama_log_callback
def _log(level, text, user_data):  # keep llama.cpp quiet; remember errors for messages
    if level >= 4 and text:  # GGML_LOG_LEVEL_ERROR == 4
        _log_lines.append(text.decode("utf-8", "replace").strip())
        del _log_lines[:-20]


def llama_errors(since: int = 0) -> list[str]:
    """llama.cpp's error lines logged since the `since`-th (the last 20 are kept), for error messages."""
    return list(_log_lines[since:])


def init_llama() -> int:
    """Initialise llama.cpp once per process, its logging quiet except errors (kept for messages);
    returns the current error-line count, to pass to `llama_errors` after a call that may fail."""
    _init()
    return len(_log_lines)


def _init():
    global _initialised
    with _init_lock:
        if not _initialised:
            ll.llama_log_set(_log, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _initialised = True


class _FreedOnDelete:
    """llama.cpp objects freed by `close()`, also when the Python object is collected."""

    def close(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the ctypes module may already be gone
            pass


class LlamaModelFile(_FreedOnDelete):
    """A loaded GGUF: model weights, vocabulary and metadata (shared by its contexts)."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, vocab_only: bool = False):
        _init()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{'vocabulary GGUF' if vocab_only else 'model file'} not found: {self.path}")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFileError(f"{self.path} is not a GGUF model file (bad magic)")
        params = ll.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.vocab_only = bool(vocab_only)
        # No "extra" CPU buffer types (weight repacking): on CPUs with AMX, llama.cpp moves Q4_1/Q8_0
        # weights into its AMX buffer, and its AMX matmul crashed the process (SIGSEGV in
        # ggml_backend_amx_mul_mat, seen on a Sapphire Rapids-class VM that does not grant AMX state).
        # A crash is never acceptable; SAFECHAT_EXTRA_BUFTS=1 turns them back on where they work.
        params.use_extra_bufts = os.environ.get("SAFECHAT_EXTRA_BUFTS") == "1"
        _log_lines.clear()
        self.model = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            detail = "; ".join(_log_lines[-3:]) or "llama.cpp could not load it"
            raise ModelFileError(f"{self.path} is corrupt or unsupported: {detail}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.metadata = self._read_metadata()
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_model_meta_val_str(self.model, b"general.architecture", buf, len(buf))
        self.architecture = buf.value.decode("utf-8", "replace") if n >= 0 else None
        tmpl = ll.llama_model_chat_template(self.model, None)
        self.chat_template = tmpl.decode("utf-8") if tmpl else None
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = ll.llama_vocab_bos(self.vocab)
        self._piece_cache: dict[int, bytes] = {}
        self._specials: tuple[Special, ...] | None = None

    def meta_value(self, key: str) -> str | None:
        """Any metadata value of the file as text (None: absent); `metadata` keeps the safety.* keys only."""
        buf = ctypes.create_string_buffer(1 << 12)
        n = ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _read_metadata(self) -> dict[str, str]:
        out = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(ll.llama_model_meta_count(self.model)):
            n = ll.llama_model_meta_key_by_index(self.model, i, buf, len(buf))
            if n < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            if not key.startswith(PREFIX):
                continue
            n = ll.llama_model_meta_val_str_by_index(self.model, i, buf, len(buf))
            if n >= 0:
                out[key] = buf.value.decode("utf-8", "replace")
        return out

    def safety_meta(self) -> SafetyMeta:
        return SafetyMeta.from_kv(self.metadata, self.n_vocab, where=str(self.path))

    def tokenize(self, text: str, special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (ll.llama_token * n_max)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            buf = (ll.llama_token * -n)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, -n, False, special)
        return list(buf[:n])

    def special_texts(self) -> tuple[Special, ...]:
        """The control (and unknown) tokens: what llama.cpp parses out of a text only with special
        parsing on (`runtime.prompt.prompt_tokens` splits template text at them). Read once."""
        if self._specials is None:
            out = []
            buf = ctypes.create_string_buffer(256)
            for t in range(self.n_vocab):
                attr = ll.llama_vocab_get_attr(self.vocab, t)
                if attr & (ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_UNKNOWN):
                    n = ll.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, True)
                    if n > 0:
                        out.append(Special(buf.raw[:n].decode("utf-8", "replace"),
                                           bool(attr & ll.LLAMA_TOKEN_ATTR_LSTRIP),
                                           bool(attr & ll.LLAMA_TOKEN_ATTR_RSTRIP)))
            self._specials = tuple(out)
        return self._specials

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[:max(n, 0)]
            self._piece_cache[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def close(self):
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)
            self.model = None
