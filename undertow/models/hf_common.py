"""What every family's Hugging Face adapter (models/<family>/hf.py) and the converter (undertow/hf/)
share: the error a refused conversion raises and the config.json key that carries our config.

It lives under models/ because the adapters are part of their family: undertow/hf/ imports them
(down the house) and re-exports these names; nothing here imports anything of undertow.
"""

from __future__ import annotations

import dataclasses

UNDERTOW_KEY = "undertow"  # config.json entry holding the undertow model config (exact round trips)


class HFConversionError(ValueError):
    """A model, config or directory cannot be converted exactly; the message says why."""


def check_model_type(config: dict, valid: tuple) -> None:
    """Refuse a config.json whose model_type is not one this adapter reads."""
    if config.get("model_type") not in valid:
        raise HFConversionError(f"model_type {config.get('model_type')!r} is not one of {valid}")


def store_config(config: dict, family: str, cfg) -> dict:
    """config (a config.json dict) with our model config (a config dataclass) and its family under
    UNDERTOW_KEY, for an exact round trip of the fields Hugging Face has no place for; returns config."""
    config[UNDERTOW_KEY] = {"model": {"family": family, **dataclasses.asdict(cfg)}}
    return config


def stored_config(config: dict) -> dict:
    """The model fields store_config put into a config.json, without the family; {} when there are none."""
    stored = dict((config.get(UNDERTOW_KEY) or {}).get("model") or {})
    stored.pop("family", None)
    return stored


def without_tied_head(tensors: dict, tie_embeddings: bool) -> dict:
    """A copy of {name: tensor}, less lm_head.weight when the head is tied to embed.weight (the embedding
    is then the head: written once and re-tied on load; some tied checkpoints store the head anyway)."""
    left = dict(tensors)
    if tie_embeddings:
        left.pop("lm_head.weight", None)
    return left
