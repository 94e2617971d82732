"""Where undertow caches what it builds on first use (the embedded corpus's shards and tokenizer,
native CPU kernels): one variable, `UNDERTOW_CACHE`, else `$XDG_CACHE_HOME/undertow`, else
`~/.cache/undertow`. `UNDERTOW_CACHE_DIR` (the native kernels' old variable) is still read, with a warning."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("undertow.cache")  # the same floor as undertow/log.py, which it may not import
_warned = False


def cache_root() -> str:
    global _warned
    if os.environ.get("UNDERTOW_CACHE"):
        return os.environ["UNDERTOW_CACHE"]
    if os.environ.get("UNDERTOW_CACHE_DIR"):
        if not _warned:
            log.warning("UNDERTOW_CACHE_DIR is the old name of UNDERTOW_CACHE (one variable for every cache): "
                        "set UNDERTOW_CACHE instead")
            _warned = True
        return os.environ["UNDERTOW_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "undertow")
