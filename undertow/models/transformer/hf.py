"""Hugging Face mapping of the transformer family's mixture-of-experts models: MixtralForCausalLM.

Which stock class fits our block: Mixtral's decoder layer is ours exactly (RMSNorm, grouped-query
attention with full-head RoPE and no q/k norms, then a sparse MoE of SwiGLU experts whose router
is a linear map, softmax, top-k renormalised). OLMoE adds q/k RMSNorms and does not renormalise
the top-k weights, so it does not compute our function. Exported: model.moe.router = "linear"
and no shared expert (Mixtral has none). The RMoE router (a GRU shared across layers) has no stock
class: those models export with remote code (hf_rmoe.py, model_type "undertow_rmoe"; `remote_code`
tells the exporter). Dense transformers (no MoE) are not mapped here.

Layouts: our experts are stacked w_gate, w_up (E, d, h) and w_down (E, h, d) (x @ W); transformers
fuses gate_up_proj (E, 2h, d) = [w_gate^T; w_up^T] and keeps down_proj (E, d, h) = w_down^T (F.linear).
"""

from __future__ import annotations

import torch

from undertow.configtools import from_dict
from undertow.models.hf_common import (HFConversionError, check_model_type, store_config, stored_config,
                                       without_tied_head)
from undertow.models.hf_remote import RemoteCode
from undertow.models.moe.config import MoEConfig
from undertow.models.transformer import hf_rmoe
from undertow.models.transformer.config import TransformerConfig

HF_MODEL_TYPES = ("mixtral", hf_rmoe.REMOTE_CODE.name)
_SAME = {  # our name inside layer i -> transformers' (prefix model.layers.i.)
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
    "mlp.router.gate.weight": "mlp.gate.weight",
}
_ENDS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
         "lm_head.weight": "lm_head.weight"}


def hf_architecture(cfg: TransformerConfig) -> str:
    if not cfg.moe.enabled:
        raise HFConversionError("the dense transformer has no Hugging Face mapping yet; MoE transformers "
                                "(model.moe.n_experts > 0) export to MixtralForCausalLM")
    if cfg.moe.router == "rmoe":
        return hf_rmoe.REMOTE_CODE.model_class
    if cfg.moe.shared_expert_hidden:
        raise HFConversionError(f"model.moe.shared_expert_hidden = {cfg.moe.shared_expert_hidden}: Mixtral has no "
                                "shared expert; only models without one export")
    return "MixtralForCausalLM"


def remote_code(cfg: TransformerConfig) -> RemoteCode | None:
    """The remote code an export of `cfg` ships (RMoE), or None (a stock class: Mixtral)."""
    return hf_rmoe.REMOTE_CODE if cfg.moe.enabled and cfg.moe.router == "rmoe" else None


def hf_config(cfg: TransformerConfig, special_ids: dict) -> dict:
    return {"architectures": [hf_architecture(cfg)], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.moe.hidden(cfg.hidden),
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "sliding_window": None, "attention_dropout": 0.0, "num_local_experts": cfg.moe.n_experts,
            "num_experts_per_tok": cfg.moe.top_k, "router_aux_loss_coef": cfg.moe.aux_loss_coef,
            "output_router_logits": False, "router_jitter_noise": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std, **{f"{k}_token_id": special_ids.get(k) for k in ("bos", "eos", "pad")}}


def to_hf(cfg: TransformerConfig, state_dict: dict, special_ids: dict) -> tuple[dict, dict]:
    """Our config + state dict -> (config.json dict, {HF name: tensor}). Every tensor of ours is used."""
    if remote_code(cfg) is not None:
        return hf_rmoe.to_hf(cfg, state_dict, special_ids)
    config = store_config(hf_config(cfg, special_ids), "transformer", cfg)
    left = without_tied_head(state_dict, cfg.tie_embeddings)
    tensors = {}
    try:
        for ours, theirs in _ENDS.items():
            if ours in left:
                tensors[theirs] = left.pop(ours)
        for i in range(cfg.n_layers):
            p, q = f"layers.{i}.", f"model.layers.{i}."
            for ours, theirs in _SAME.items():
                tensors[q + theirs] = left.pop(p + ours)
            gate, up = left.pop(p + "mlp.w_gate"), left.pop(p + "mlp.w_up")
            tensors[q + "mlp.experts.gate_up_proj"] = torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], 1).contiguous()
            tensors[q + "mlp.experts.down_proj"] = left.pop(p + "mlp.w_down").transpose(1, 2).contiguous()
    except KeyError as e:
        raise HFConversionError(f"the checkpoint lacks {e.args[0]}") from None
    if left:
        raise HFConversionError(f"tensors with no Hugging Face counterpart: {sorted(left)}")
    return config, tensors


def config_from_hf(config: dict) -> TransformerConfig:
    """The TransformerConfig of a Mixtral config.json (the stored undertow config when it still
    describes the same architecture: exact round trip of fields Mixtral has no place for)."""
    check_model_type(config, HF_MODEL_TYPES)
    if config.get("sliding_window"):
        raise HFConversionError(f"sliding_window = {config['sliding_window']}: undertow's attention is full causal")
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 1e6)}
    if rope.get("rope_type", "default") != "default":
        raise HFConversionError(f"rope_parameters {rope}: only default RoPE is supported")
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        raise HFConversionError(f"head_dim = {config['head_dim']}: undertow's heads are hidden_size / heads")
    derived = TransformerConfig(
        vocab_size=config["vocab_size"], d_model=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=heads, n_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_hidden=config["intermediate_size"], rope_theta=float(rope.get("rope_theta", 1e6)),
        norm_eps=config.get("rms_norm_eps", 1e-5), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        moe=MoEConfig(n_experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
                      aux_loss_coef=config.get("router_aux_loss_coef", 0.02)))
    stored = stored_config(config)
    if stored:
        try:
            candidate = from_dict(TransformerConfig, stored, "model")
            if _shape(candidate) == _shape(derived):
                return candidate
        except ValueError:  # hand-edited: not a config of this file's architecture
            pass
    return derived


def _shape(cfg: TransformerConfig) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_parameters", "num_local_experts", "num_experts_per_tok",
            "tie_word_embeddings")
    config = hf_config(cfg, {})
    return {k: config[k] for k in keys}


def from_hf(config: dict, tensors: dict) -> tuple[TransformerConfig, dict]:
    """config.json dict + {HF name: tensor} -> (TransformerConfig, our state dict). Every HF tensor is used."""
    if config.get("model_type") == hf_rmoe.REMOTE_CODE.name:
        return hf_rmoe.from_hf(config, tensors)
    cfg = config_from_hf(config)
    cfg.validate()
    left = without_tied_head(tensors, cfg.tie_embeddings)
    state = {}
    try:
        for ours, theirs in _ENDS.items():
            if theirs in left:
                state[ours] = left.pop(theirs)
        for i in range(cfg.n_layers):
            p, q = f"layers.{i}.", f"model.layers.{i}."
            for ours, theirs in _SAME.items():
                state[p + ours] = left.pop(q + theirs)
            gate, up = left.pop(q + "mlp.experts.gate_up_proj").chunk(2, dim=1)
            state[p + "mlp.w_gate"] = gate.transpose(1, 2).contiguous()
            state[p + "mlp.w_up"] = up.transpose(1, 2).contiguous()
            state[p + "mlp.w_down"] = left.pop(q + "mlp.experts.down_proj").transpose(1, 2).contiguous()
    except KeyError as e:
        raise HFConversionError(f"the Hugging Face weights lack {e.args[0]!r}") from None
    if left:
        raise HFConversionError(f"Hugging Face tensors with no undertow counterpart: {sorted(left)}")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return cfg, state
