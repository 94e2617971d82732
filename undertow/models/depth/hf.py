"""Hugging Face mapping of the recurrent-depth family, through remote code (no stock class exists).

Export writes config.json (model_type "undertow_depth", our shapes under transformers' usual names,
`auto_map`, and our whole config under UNDERTOW_KEY for an exact return), model.safetensors with
our own parameter names (the remote model, remote/modeling_undertow_depth.py, has our module
tree; a tied head is not written twice: the remote model ties it again; models/hf_stored.py) and the
two remote-code files (undertow/hf/remote.py). Huginn's exported depth is the eval depth (config.num_steps;
`model(ids, num_steps=r)` picks another), its initial state the same hashed truncated normal as
our eval forward, so logits agree.
"""

from __future__ import annotations

from undertow.configtools import from_dict
from undertow.models.depth.config import DepthConfig
from undertow.models.hf_common import HFConversionError
from undertow.models.hf_remote import RemoteCode
from undertow.models.hf_stored import from_hf_stored, to_hf_stored

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
    if cfg.moe.enabled:  # the remote model's blocks have a SwiGLU MLP only
        raise HFConversionError(f"model.moe.n_experts = {cfg.moe.n_experts}: the depth family's remote code has no "
                                "mixture-of-experts MLP; only dense models (n_experts 0) export")
    return to_hf_stored("depth", cfg, hf_config(cfg, special_ids), state_dict)


def from_hf(config: dict, tensors: dict) -> tuple[DepthConfig, dict]:
    return from_hf_stored(config, tensors, "depth", DepthConfig, hf_config, HF_MODEL_TYPES,
                          parse=lambda stored: from_dict(DepthConfig, stored, "model"))  # nested model.moe
