"""Configuration of undertow's mixture-of-experts transformers with the RMoE router (a GRU shared
by all layers whose state runs from layer to layer) for Hugging Face transformers, written by
undertow's `convert to-hf`. Self-contained: needs torch and transformers, not undertow."""

from transformers import PretrainedConfig


class UndertowRMoEConfig(PretrainedConfig):
    model_type = "undertow_rmoe"

    def __init__(self, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=16, intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, num_experts=8, num_experts_per_tok=2, router_dim=256,
                 shared_expert_intermediate_size=0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size      # each expert's SwiGLU width
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.num_experts = num_experts                  # E per MoE layer (every block's MLP)
        self.num_experts_per_tok = num_experts_per_tok  # top-k, weights renormalised over the k
        self.router_dim = router_dim                    # the GRU's width r
        self.shared_expert_intermediate_size = shared_expert_intermediate_size  # 0: no shared expert
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
