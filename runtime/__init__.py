"""A local chat runtime with an explicit safety signal.

    import runtime
    r = runtime.chat("How do I bake bread?")     # embedded default safe model
    r.text, r.refused, r.safety
    for piece in runtime.chat(messages, stream=True): ...
    m = runtime.load(path=None, backend="llama", n_gpu_layers=0, threads=None, safety="on", native=None)
"""
from __future__ import annotations

import threading

from .errors import (ContextOverflowError, MessagesError, ModelBusyError, ModelFileError, ParameterError,
                     RuntimeSafetyError)
from .model import Model, load
from .policy import SafetyPolicy
from .reply import Reply, Safety, Usage
from .strategy import Generation

__all__ = ["chat", "load", "Model", "Reply", "Safety", "Usage", "Generation", "SafetyPolicy",
           "ModelFileError", "MessagesError", "ContextOverflowError", "RuntimeSafetyError", "ModelBusyError",
           "ParameterError"]

_default: Model | None = None
_default_lock = threading.Lock()


def get_default_model() -> Model:
    """The embedded default safe model, loaded once per process."""
    global _default
    with _default_lock:
        if _default is None:
            _default = load()
        return _default


def chat(messages, *, stream: bool = False, **kwargs):
    """Chat with the embedded default safe model; see `Model.chat` for the arguments."""
    return get_default_model().chat(messages, stream=stream, **kwargs)
