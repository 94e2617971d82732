"""Configuration of undertow's Titans models (attention beside a neural long-term memory learned at
test time, in the MAC / MAG / MAL architectures) for Hugging Face transformers, written by
undertow's `convert to-hf`. Self-contained: needs torch and transformers, not undertow."""

from transformers import PretrainedConfig


class UndertowTitansConfig(PretrainedConfig):
    model_type = "undertow_titans"

    def __init__(self, variant="mac", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=192, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                 mem_heads=4, mem_depth=2, mem_hidden=32, chunk_size=16, segment_len=64, window=64,
                 persistent_tokens=4, max_lr=0.1, mem_loss="l2", huber_delta=1.0, mem_optimizer="momentum",
                 mem_retention="decay", omega_window=1, max_grad_norm=1.0, **kwargs):
        self.variant = variant                      # mac (memory as a context), mag (a gate), mal (a layer)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size  # SwiGLU hidden width
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.mem_heads = mem_heads                  # independent memories of hidden_size / mem_heads channels
        self.mem_depth = mem_depth                  # 1: linear memory; >= 2: MLP with a residual
        self.mem_hidden = mem_hidden                # the MLP memory's hidden width
        self.chunk_size = chunk_size                # inner gradients at the weights of each chunk's start
        self.segment_len = segment_len              # mac: attention segment
        self.window = window                        # mag/mal: sliding-window width
        self.persistent_tokens = persistent_tokens  # learned keys/values every query sees
        self.max_lr = max_lr                        # inner learning rate theta = max_lr * sigmoid(.)
        self.mem_loss = mem_loss                    # l2 or huber
        self.huber_delta = huber_delta
        self.mem_optimizer = mem_optimizer          # momentum or sgd (no momentum)
        self.mem_retention = mem_retention          # decay (forgetting gate) or none
        self.omega_window = omega_window            # ATLAS Omega rule: the last c tokens' gated losses
        self.max_grad_norm = max_grad_norm          # per-token inner gradient clipping (0: none)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
