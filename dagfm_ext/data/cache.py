"""Where downloaded and preprocessed data is kept between runs."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$DAGFM_EXT_CACHE``, else ``$XDG_CACHE_HOME/dagfm_ext``, else ``~/.cache/dagfm_ext``."""
    env = os.environ.get("DAGFM_EXT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dagfm_ext"
