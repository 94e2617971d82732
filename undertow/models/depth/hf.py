"""Hugging Face mapping of the recurrent-depth family, through remote code (no stock class exists).

Export writes config.json (model_type "undertow_depth", our shapes under transformers' usual names,
`auto_map`, and our whole config under UNDERTOW_KEY for an exact return), model.safetensors with
our own parameter names (the remote model, remote/modeling_undertow_depth.py, has our module
tree; a tied head is not written twice: the remote model ties it again) and the two remote-code
files (undertow/hf/remote.py). Huginn's exported depth is the eval depth (config.num_steps;
`model(ids, num_steps=r)` picks another), its initial state the same hashed truncated normal as
our eval forward, so logits agree.
"""

from __future__ import annotations

import dataclasses

import torch

from undertow.models.depth.config import DepthConfig
from undertow.models.hf_common import (UNDERTOW_KEY, HFConversionError, check_model_type, store_config,
                                       stored_config, without_tied_head)
from undertow.models.hf_remote import RemoteCode

REMOTE_CODE = RemoteCode(name="undertow_depth", package="undertow.models.depth.remote",
                         config_class="UndertowDepthConfig", model_class="UndertowDepthForCausalLM")
HF_MODEL_TYPES = (REMOTE_CODE.name,)


def hf_architecture(cfg: DepthConfig) -> str:
    return REMOTE_CODE.model_class


def hf_config(cfg: DepthConfig, special_ids: dict) -> dict:
    """The remote config's fields for `cfg` (what the remote model computes with)."""
    config = {
        "arch": cfg.arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "max_steps": cfg.max_steps, "act": cfg.act,
        "act_eps": cfg.act_eps, "n_prelude": cfg.n_prelude, "n_core": cfg.n_core, "n_coda": cfg.n_coda,
        "qk_bias": cfg.qk_bias, "input_scale": cfg.input_scale, "num_steps": cfg.test_depth,
        "depth_seed": cfg.depth_seed,
    }
    config.update({f"{role}_token_id": i for role, i in special_ids.items() if i is not None})
    return config


def to_hf(cfg: DepthConfig, state_dict: dict, special_ids: dict) -> tuple[dict, dict]:
    config = store_config(hf_config(cfg, special_ids), "depth", cfg)
    tensors = without_tied_head(state_dict, cfg.tie_embeddings)
    return config, tensors


def from_hf(config: dict, tensors: dict) -> tuple[DepthConfig, dict]:
    check_model_type(config, HF_MODEL_TYPES)
    stored = stored_config(config)
    fields = {f.name for f in dataclasses.fields(DepthConfig)}
    if not stored or not set(stored) <= fields:
        raise HFConversionError(f"config.json has no undertow depth config under {UNDERTOW_KEY!r} (only "
                                "directories written by `undertow convert to-hf` import)")
    cfg = DepthConfig(**stored)
    cfg.validate()
    theirs = {k: v for k, v in config.items() if k in hf_config(cfg, {})}
    if theirs != hf_config(cfg, {}):
        changed = sorted(k for k, v in hf_config(cfg, {}).items() if theirs.get(k) != v)
        raise HFConversionError(f"config.json's {changed} disagree with its stored undertow config; "
                                "edit neither by hand")
    state = {name: t for name, t in tensors.items()}
    if cfg.tie_embeddings:
        if "embed.weight" not in state:
            raise HFConversionError("the weights have no embed.weight")
        state["lm_head.weight"] = state["embed.weight"]
    return cfg, {name: t.to(torch.float32) for name, t in state.items()}
