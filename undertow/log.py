"""One logger for the package; console output goes through it."""

import logging
import sys

_CONFIGURED = False


def get_logger(name: str = "undertow") -> logging.Logger:
    """Return a logger under the `undertow` namespace, configuring the console handler once."""
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("undertow")
        if not root.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
            root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("undertow") else f"undertow.{name}")
