"""Errors the runtime raises on bad input: each names the problem in plain words."""


class RuntimeSafetyError(Exception):
    """Base class for every error the runtime raises on purpose."""


class ModelFileError(RuntimeSafetyError):
    """The model file is missing, unreadable, corrupt or not a safe model."""


class MessagesError(RuntimeSafetyError, ValueError):
    """The `messages` argument is malformed."""


class ContextOverflowError(RuntimeSafetyError, ValueError):
    """The conversation does not fit in the model's context window."""
