"""Locations that the package reads and writes outside a run folder."""

import os
from pathlib import Path

CACHE_ENV_VAR = "CBIR_CACHE_DIR"


def default_cache_dir() -> Path:
    """Return the user cache folder: ``$CBIR_CACHE_DIR``, else ``~/.cache/cbir_lightning``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / "cbir_lightning"
