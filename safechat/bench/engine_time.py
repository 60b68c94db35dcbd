"""Time spent inside the inference engine during a run: what the "Python share" is measured against.

A run's wall time splits into (a) engine calls made from Python, (b) the runtime's native decode
loop, which runs in C with the GIL released, and (c) everything else: Python (the strategy, the
ctypes glue, detokenizing, the caller's loop). `engine_timer()` measures (a) by wrapping, for the
duration of one instrumented run, the engine entry points with a perf_counter pair:

* llama.cpp: the calls that do work in C (`LLAMA_CALLS`: decode, sampling, reading logits,
  synchronising, clearing/trimming the KV cache, tokenizing and detokenizing), in both namespaces
  Python code calls them through (`llama_cpp.X`, which the runtime uses, and
  `llama_cpp.llama_cpp.X`, which llama-cpp-python's own `Llama` uses). Reading logits is included
  because on a GPU it is where the host waits for the asynchronous decode to finish. The other
  llama.cpp calls (an end-of-generation test, sampler set-up) cost about what their ctypes glue
  costs and are left on the Python side.
* onnxruntime: `run_with_iobinding` and `run` of the given `InferenceSession`.

(b) is the loop's own clock, `Reply.usage.native_seconds`; calls the C loop makes itself never pass
through Python, so nothing is counted twice. The wrapper's own cost (a Python frame and two clock
reads per call, well under a microsecond) falls outside the timed interval and is counted as Python:
the share is a slight over-estimate, never an under-estimate.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

LLAMA_CALLS = ("llama_decode", "llama_encode", "llama_sampler_sample", "llama_get_logits_ith", "llama_get_logits",
               "llama_synchronize", "llama_memory_clear", "llama_memory_seq_rm", "llama_tokenize",
               "llama_detokenize", "llama_token_to_piece")
ONNX_CALLS = ("run_with_iobinding", "run")


class EngineTimer:
    """Accumulates the time spent inside wrapped engine calls."""

    def __init__(self):
        self.by_call: dict[str, list] = {}  # name -> [seconds, calls]

    @property
    def seconds(self) -> float:
        return sum(s for s, _ in self.by_call.values())

    def wrap(self, name: str, fn):
        slot = self.by_call.setdefault(name, [0.0, 0])

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                slot[0] += time.perf_counter() - t
                slot[1] += 1
        return timed


@contextmanager
def engine_timer(onnx_session=None) -> Iterator[EngineTimer]:
    """Wrap the engine's entry points while the block runs; restore them afterwards."""
    import llama_cpp
    import llama_cpp.llama_cpp as llama_cpp_module

    timer = EngineTimer()
    targets = [(llama_cpp, LLAMA_CALLS), (llama_cpp_module, LLAMA_CALLS)]
    if onnx_session is not None:
        targets.append((onnx_session, ONNX_CALLS))
    saved = []
    try:
        for obj, names in targets:
            for name in names:
                if hasattr(obj, name):
                    own = name in vars(obj)  # a session's methods live on its class
                    orig = getattr(obj, name)
                    saved.append((obj, name, orig, own))
                    setattr(obj, name, timer.wrap(name, orig))
        yield timer
    finally:
        for obj, name, orig, own in reversed(saved):
            if own:
                setattr(obj, name, orig)
            else:
                delattr(obj, name)
