"""Errors raised when a backbone's weights cannot be obtained."""


class WeightsUnavailableError(RuntimeError):
    """The requested weights cannot be loaded on this machine.

    The message names the backbone, the weight source that was tried and the alternatives.
    """
