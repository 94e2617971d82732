"""Hugging Face mapping of MoE transformers with the RMoE router, through remote code (no stock
transformers class has a router recurrent across layers).

Export writes config.json (model_type "undertow_rmoe", our shapes under transformers' usual names,
`auto_map`, and our whole config under UNDERTOW_KEY for an exact return), model.safetensors with our
own parameter names (the remote model, remote/modeling_undertow_rmoe.py, has our module tree; a tied
head is not written twice: the remote model ties it again) and the two remote-code files
(undertow/hf/remote.py); the round trip is models/hf_stored.py's. The transformer family's adapter
(hf.py) sends rmoe models here.
"""

from __future__ import annotations

from undertow.configtools import from_dict
from undertow.models.hf_remote import RemoteCode
from undertow.models.hf_stored import from_hf_stored, to_hf_stored
from undertow.models.transformer.config import TransformerConfig

REMOTE_CODE = RemoteCode(name="undertow_rmoe", package="undertow.models.transformer.remote",
                         config_class="UndertowRMoEConfig", model_class="UndertowRMoEForCausalLM")


def hf_config(cfg: TransformerConfig, special_ids: dict) -> dict:
    """The remote config's fields for `cfg` (what the remote model computes with)."""
    moe = cfg.moe
    config = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": moe.hidden(cfg.hidden), "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k,
        "router_dim": moe.router_dim, "shared_expert_intermediate_size": moe.shared_expert_hidden,
    }
    config.update({f"{role}_token_id": i for role, i in special_ids.items() if i is not None})
    return config


def to_hf(cfg: TransformerConfig, state_dict: dict, special_ids: dict) -> tuple[dict, dict]:
    return to_hf_stored("transformer", cfg, hf_config(cfg, special_ids), state_dict)


def from_hf(config: dict, tensors: dict) -> tuple[TransformerConfig, dict]:
    """config.json (written by `convert to-hf`) + tensors -> (TransformerConfig, our state dict)."""
    return from_hf_stored(config, tensors, "transformer", TransformerConfig, hf_config, (REMOTE_CODE.name,),
                          parse=lambda stored: from_dict(TransformerConfig, stored, "model"))
