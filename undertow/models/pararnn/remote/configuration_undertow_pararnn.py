"""Configuration of undertow's ParaRNN language models (ParaGRU / ParaLSTM blocks, optionally mixed
with attention and MLP blocks by a layer pattern) for Hugging Face transformers, written by
undertow's `convert to-hf`. Self-contained: needs transformers, not undertow."""

from transformers import PretrainedConfig


class UndertowParaRNNConfig(PretrainedConfig):
    model_type = "undertow_pararnn"

    def __init__(self, vocab_size=256, hidden_size=64, layer_pattern="g-g-", num_hidden_layers=4, cell_size=64,
                 cell_heads=4, conv_width=4, conv_bias=True, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, rope_theta=10000.0, intermediate_size=192, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.layer_pattern = layer_pattern                # g ParaGRU, l ParaLSTM, * attention, - SwiGLU MLP
        self.num_hidden_layers = num_hidden_layers        # len(layer_pattern)
        self.cell_size = cell_size                        # channels D of the cell layers (expand * hidden_size)
        self.cell_heads = cell_heads                      # channel groups: block-diagonal input projection, norm
        self.conv_width = conv_width                      # causal depthwise conv before the cell
        self.conv_bias = conv_bias
        self.num_attention_heads = num_attention_heads    # `*` layers
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.intermediate_size = intermediate_size        # `-` layers' SwiGLU width
        self.rms_norm_eps = rms_norm_eps
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
