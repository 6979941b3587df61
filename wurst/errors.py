"""Error classes. Every message is one line that names the culprit and, where it can, the fix."""


class WurstError(Exception):
    """Base class for every error wurst raises on bad input or bad files."""


class ModelNotFoundError(WurstError, FileNotFoundError):
    """A model reference (hub id or directory) that cannot be found, or a folder in neither hub nor converted layout."""


class ArgumentError(WurstError, ValueError):
    """A call argument or option that cannot work: a size off the grid, a bad step count, mismatched prompts."""


class InsufficientMemoryError(ArgumentError):
    """A generation whose estimated peak memory is over what the device has: refused before it starts."""


class ConfigError(WurstError, ValueError):
    """A config.json that is not valid JSON or lacks a field."""


class CheckpointError(WurstError, ValueError):
    """A weight file that is corrupt, truncated, or holds missing, unexpected or mis-shaped tensors."""


class NumericalError(WurstError):
    """NaN or inf in the latents, typically float16 overflow."""
