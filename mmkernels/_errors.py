"""The error bad arguments raise in the modules (and the concat-linear / low-rank functional API)."""


class ArgumentError(ValueError, AssertionError):
    """A malformed argument: a ValueError that is also an AssertionError, because nn.MultiheadAttention
    and other layers the modules replace raise AssertionError for malformed shapes, and code written
    against them catches that. The message names the argument."""
