"""What every family's Hugging Face adapter (models/<family>/hf.py) and the converter (undertow/hf/)
share: the error a refused conversion raises and the config.json key that carries our config.

It lives under models/ because the adapters are part of their family: undertow/hf/ imports them
(down the house) and re-exports these names; nothing here imports anything of undertow.
"""

UNDERTOW_KEY = "undertow"  # config.json entry holding the undertow model config (exact round trips)


class HFConversionError(ValueError):
    """A model, config or directory cannot be converted exactly; the message says why."""
