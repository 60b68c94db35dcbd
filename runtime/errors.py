"""Errors the runtime raises on bad input: each names the problem in plain words."""


class RuntimeSafetyError(Exception):
    """Base class for every error the runtime raises on purpose."""


class ModelFileError(RuntimeSafetyError):
    """The model file is missing, unreadable, corrupt or not a safe model."""


class MessagesError(RuntimeSafetyError, ValueError):
    """The `messages` argument is malformed."""


class ContextOverflowError(RuntimeSafetyError, ValueError):
    """The conversation does not fit in the model's context window."""


class ModelBusyError(RuntimeSafetyError):
    """The model is generating for another call (one KV cache: one generation at a time)."""


class ParameterError(RuntimeSafetyError, ValueError):
    """A generation parameter (temperature, top_p, seed, stop, ...) is out of range or of the wrong type.

    `param` names it (the server answers it as the OpenAI error's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
