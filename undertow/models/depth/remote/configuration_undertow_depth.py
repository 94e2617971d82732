"""Configuration of undertow's recurrent-depth models (Universal Transformer with ACT, Huginn-style
prelude -> looped core -> coda) for Hugging Face transformers, written by undertow's
`convert to-hf`. Self-contained: needs torch and transformers, not undertow."""

from transformers import PretrainedConfig


class UndertowDepthConfig(PretrainedConfig):
    model_type = "undertow_depth"

    def __init__(self, arch="huginn", vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, max_steps=6, act=True, act_eps=0.01, n_prelude=2, n_core=2, n_coda=2,
                 qk_bias=True, input_scale=1.0, num_steps=8, depth_seed=0, **kwargs):
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_steps = max_steps          # ut: most ACT steps
        self.act = act                      # ut: adaptive computation time (else max_steps steps)
        self.act_eps = act_eps              # ut: halt once the halting sum exceeds 1 - act_eps
        self.n_prelude = n_prelude          # huginn: blocks before the loop
        self.n_core = n_core                # huginn: blocks of the looped core
        self.n_coda = n_coda                # huginn: blocks after the loop
        self.qk_bias = qk_bias              # huginn: q/k projection biases
        self.input_scale = input_scale      # huginn: embedding and initial-state scale
        self.num_steps = num_steps          # huginn: default depth r (forward(num_steps=...) overrides)
        self.depth_seed = depth_seed        # huginn: seed of the initial latent state's hash
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
