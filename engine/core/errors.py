"""Errors the engine raises for problems a user can act on."""


class EngineError(Exception):
    """Base class of the engine's user-facing errors."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model it claims to hold."""


class ConfigError(EngineError, ValueError):
    """A model configuration is incomplete or contradicts itself or the weights."""


class SamplingError(EngineError, ValueError):
    """Sampling arguments that cannot be honoured (bad labels, schedule, temperature...)."""


class OutputError(EngineError, ValueError):
    """An output path that cannot be written as asked (missing parent, not empty, a file)."""
