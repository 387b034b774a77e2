"""Shared behaviour of the command-line entry points."""

import logging
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import InstantiationException

from cbir_lightning.models.weights.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that come from the configuration, the data or the machine. They are shown as one clear line; the
# traceback is logged at DEBUG level, which hydra.verbose=true shows.
USER_ERRORS = (
    WeightsUnavailableError,
    NotImplementedError,
    FileNotFoundError,
    NotADirectoryError,
    ValueError,
    TimeoutError,
    InstantiationException,
)


def exit_on_user_error(run: Callable[[], T]) -> T:
    """Call ``run``; on a user error, log its message and exit with status 1 instead of a traceback."""
    try:
        return run()
    except USER_ERRORS as error:
        log.debug("Traceback of the error below", exc_info=error)
        log.error("%s", error)
        raise SystemExit(1) from error
