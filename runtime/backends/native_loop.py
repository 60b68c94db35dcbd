"""The native decode loop (cpp_ext/loop.c) bound to the libllama that llama-cpp-python loaded.

`_native.Loop` calls six llama.cpp functions through addresses taken here from
`llama_cpp.llama_cpp._lib`, the library object llama-cpp-python itself uses, so one process
never holds two libllamas. Before a first Loop is built, `check_abi()` compares what the C code
was compiled with (the `llama_batch` layout it declares, and the argument/return sizes of the
functions it calls) with llama-cpp-python's ctypes declarations; a mismatch (another
llama-cpp-python version) raises `NativeLoopError` naming the difference instead of crashing.
"""
from __future__ import annotations

import ctypes

import llama_cpp.llama_cpp as llc

from ..policy import LoopSpec, loop_spec

try:
    import runtime._native as _native  # the compiled module itself, not the package API
except ImportError:  # pragma: no cover - only when the package was not installed with pip
    _native = None

BATCH_FIELDS = ("n_tokens", "token", "embd", "pos", "n_seq_id", "seq_id", "logits")
P = ctypes.sizeof(ctypes.c_void_p)
# name -> (size of the return value, sizes of the arguments), as cpp_ext/loop.h declares them
FUNCTIONS = {
    "llama_decode": (4, (P, "batch")),
    "llama_get_logits_ith": (P, (P, 4)),
    "llama_memory_seq_rm": (1, (P, 4, 4, 4)),
    "llama_sampler_sample": (4, (P, P, 4)),
    "llama_vocab_is_eog": (1, (P, 4)),
    "llama_token_to_piece": (4, (P, 4, P, 4, 4, 1)),
}


class NativeLoopError(RuntimeError):
    """The native loop cannot run against the loaded llama-cpp-python (ABI mismatch or not built)."""


def _size(t) -> int:
    return 0 if t is None else ctypes.sizeof(t)


def check_abi(lib=None, batch_type=None) -> None:
    """Raise NativeLoopError unless the compiled loop matches llama-cpp-python's declarations."""
    if _native is None or not hasattr(_native, "Loop"):
        raise NativeLoopError("runtime._native was not built with the decode loop; reinstall with pip install -e .")
    lib = llc._lib if lib is None else lib
    batch_type = llc.llama_batch if batch_type is None else batch_type
    fields = getattr(_native, "POLICY_FIELDS", None)
    if fields != LoopSpec._fields:
        raise NativeLoopError(f"runtime._native reads the policy as {fields}, runtime.policy.LoopSpec is "
                              f"{LoopSpec._fields}: rebuild the module (pip install -e .)")
    ours = _native.batch_layout()
    theirs = {"size": ctypes.sizeof(batch_type)}
    for name in BATCH_FIELDS:
        field = getattr(batch_type, name, None)
        theirs[name] = None if field is None else field.offset
    diff = [f"{k}: C {ours[k]} vs ctypes {theirs[k]}" for k in ours if ours[k] != theirs.get(k)]
    if diff:
        raise NativeLoopError("llama_batch layout of runtime._native does not match llama-cpp-python's "
                              f"({'; '.join(diff)}); the native loop is built for llama-cpp-python 0.3.36")
    for name, (ret, args) in FUNCTIONS.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise NativeLoopError(f"the loaded libllama has no {name}")
        want = [ctypes.sizeof(batch_type) if a == "batch" else a for a in args]
        got_args = [_size(t) for t in (fn.argtypes or [])]
        if _size(fn.restype) != ret or got_args != want:
            raise NativeLoopError(f"{name} is declared differently by llama-cpp-python (returns {_size(fn.restype)} "
                                  f"bytes, arguments {got_args}) than by runtime._native ({ret}, {want})")


def function_addresses(lib=None) -> tuple[int, ...]:
    lib = llc._lib if lib is None else lib
    return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in FUNCTIONS)


_checked = False


def _ensure_abi() -> None:
    global _checked
    if not _checked:
        check_abi()
        _checked = True


def available() -> bool:
    try:
        _ensure_abi()
        return True
    except NativeLoopError:
        return False


def _addr(handle) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


class FusedLoop:
    """One generation's native loop over a LlamaBackend; keeps the backend's position in sync."""

    def __init__(self, backend, policy, threshold: float | None, max_tokens: int, n_prompt: int, streak: int):
        _ensure_abi()
        self.backend = backend  # keeps the context, sampler and model alive while the loop runs
        safe, unsafe = backend.safety_ids[-2:] if backend.safety_ids else (-1, -1)
        self._loop = _native.Loop(
            function_addresses(), _addr(backend.ctx), _addr(backend.mem), _addr(backend.sampler),
            _addr(backend.mf.vocab), side=tuple(backend.side), safe_id=safe, unsafe_id=unsafe, n_vocab=backend.mf.n_vocab,
            n_ctx=backend.n_ctx, n_prompt=n_prompt, n_past=backend.n_past, row=backend._row,
            policy=tuple(loop_spec(policy, threshold)),  # the spec the Python loop reads too
            excluded=backend.masked_ids,  # left out of the hesitation statistics, as the Python loop does
            max_tokens=max_tokens, streak=streak, last_covered=0)
        # the tokens in the cache cells, kept in step with the C loop's decodes (prefix reuse, next turn)
        self._cells = list(backend._cells) if backend._cells is not None else None
        backend._cells = None  # unknown while the C loop runs

    def run(self):
        event = None
        try:
            event = self._loop.run()
            return event
        finally:
            b = self.backend
            b.n_past, b._row = self._loop.n_past, self._loop.row
            if self._cells is not None and event is not None:
                self._cells.extend(event[1])  # tokens sampled since the last hand-over
                b._cells = self._cells[:b.n_past] if len(self._cells) >= b.n_past else None

    @property
    def seconds(self) -> float:
        return self._loop.seconds
