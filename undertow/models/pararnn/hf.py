"""Hugging Face mapping of the ParaRNN family, through remote code (transformers has no ParaRNN class).

Export writes config.json (model_type "undertow_pararnn", our shapes under transformers' usual names,
`auto_map`, and our whole config under UNDERTOW_KEY for an exact return), model.safetensors with
our own parameter names (remote/modeling_undertow_pararnn.py has our module tree; a tied head is
written once and tied again on load) and the two remote-code files (undertow/hf/remote.py).

The remote model evaluates the ParaGRU / ParaLSTM cells by the plain sequential loop (the kernels'
reference, one cell step per token): the export is for inference, where the Newton solve buys
nothing. Its logits are the converged solution of ours (Newton's `iterations` and `tol` are training
settings and stay in the stored config only); they agree with our forward wherever Newton has
converged (the "pararnn/residual" metric). The remote model has no mixture-of-experts blocks: a
pattern with `E` is refused at export.
"""

from __future__ import annotations

from undertow.configtools import from_dict
from undertow.models.hf_common import HFConversionError
from undertow.models.hf_remote import RemoteCode
from undertow.models.hf_stored import from_hf_stored, to_hf_stored
from undertow.models.pararnn.config import ParaRNNConfig

REMOTE_CODE = RemoteCode(name="undertow_pararnn", package="undertow.models.pararnn.remote",
                         config_class="UndertowParaRNNConfig", model_class="UndertowParaRNNForCausalLM")
HF_MODEL_TYPES = (REMOTE_CODE.name,)


def hf_architecture(cfg: ParaRNNConfig) -> str:
    return REMOTE_CODE.model_class


def hf_config(cfg: ParaRNNConfig, special_ids: dict) -> dict:
    """The remote config's fields for `cfg` (what the remote model computes with)."""
    config = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "layer_pattern": cfg.layer_pattern,
        "num_hidden_layers": cfg.n_layers, "cell_size": cfg.d_inner, "cell_heads": cfg.heads,
        "conv_width": cfg.conv_width, "conv_bias": cfg.conv_bias, "num_attention_heads": cfg.attn_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_model // cfg.attn_heads,
        "rope_theta": cfg.rope_theta, "intermediate_size": cfg.hidden, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    config.update({f"{role}_token_id": i for role, i in special_ids.items() if i is not None})
    return config


def to_hf(cfg: ParaRNNConfig, state_dict: dict, special_ids: dict) -> tuple[dict, dict]:
    if "E" in cfg.layer_pattern:
        raise HFConversionError(f"layer_pattern {cfg.layer_pattern!r} has mixture-of-experts (E) blocks, which "
                                "the ParaRNN remote code does not implement; export a pattern of g, l, *, - only")
    return to_hf_stored("pararnn", cfg, hf_config(cfg, special_ids), state_dict)


def from_hf(config: dict, tensors: dict) -> tuple[ParaRNNConfig, dict]:
    return from_hf_stored(config, tensors, "pararnn", ParaRNNConfig, hf_config, HF_MODEL_TYPES,
                          parse=lambda stored: from_dict(ParaRNNConfig, stored, "model"))  # nested model.moe
