"""Hugging Face mapping of the Titans family, through remote code (no stock class exists).

Export writes config.json (model_type "undertow_titans", our shapes under transformers' usual names,
`auto_map`, and our whole config under UNDERTOW_KEY for an exact return), model.safetensors with our
own parameter names (the remote model, remote/modeling_undertow_titans.py, has our module tree; a
tied head is not written twice: the remote model ties it again; models/hf_stored.py) and the two
remote-code files (undertow/hf/remote.py). The remote model runs the memory's chunk-start rule token
by token (plain torch, inference only), so its logits equal our forward's. It has no mixture-of-experts
FFN: a model with model.moe.n_experts > 0 is refused at export.
"""

from __future__ import annotations

from undertow.configtools import from_dict
from undertow.models.hf_common import HFConversionError
from undertow.models.hf_remote import RemoteCode
from undertow.models.hf_stored import from_hf_stored, to_hf_stored
from undertow.models.titans.config import TitansConfig

REMOTE_CODE = RemoteCode(name="undertow_titans", package="undertow.models.titans.remote",
                         config_class="UndertowTitansConfig", model_class="UndertowTitansForCausalLM")
HF_MODEL_TYPES = (REMOTE_CODE.name,)


def hf_architecture(cfg: TitansConfig) -> str:
    return REMOTE_CODE.model_class


def hf_config(cfg: TitansConfig, special_ids: dict) -> dict:
    """The remote config's fields for `cfg` (what the remote model computes with)."""
    config = {
        "variant": cfg.variant, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.hidden,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "mem_heads": cfg.mem_heads, "mem_depth": cfg.mem_depth, "mem_hidden": cfg.mem_hidden,
        "chunk_size": cfg.chunk_size, "segment_len": cfg.segment_len, "window": cfg.window,
        "persistent_tokens": cfg.persistent_tokens, "max_lr": cfg.max_lr, "mem_loss": cfg.mem_loss,
        "huber_delta": cfg.huber_delta, "mem_optimizer": cfg.mem_optimizer, "mem_retention": cfg.mem_retention,
        "omega_window": cfg.omega_window, "max_grad_norm": cfg.max_grad_norm,
    }
    config.update({f"{role}_token_id": i for role, i in special_ids.items() if i is not None})
    return config


def to_hf(cfg: TitansConfig, state_dict: dict, special_ids: dict) -> tuple[dict, dict]:
    if cfg.moe.enabled:
        raise HFConversionError(f"model.moe.n_experts = {cfg.moe.n_experts}: the Titans remote code has no "
                                "mixture-of-experts FFN; only dense models (n_experts 0) export")
    return to_hf_stored("titans", cfg, hf_config(cfg, special_ids), state_dict)


def from_hf(config: dict, tensors: dict) -> tuple[TitansConfig, dict]:
    return from_hf_stored(config, tensors, "titans", TitansConfig, hf_config, HF_MODEL_TYPES,
                          parse=lambda stored: from_dict(TitansConfig, stored, "model"))  # nested model.moe
