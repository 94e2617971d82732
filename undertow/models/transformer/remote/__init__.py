"""The Hugging Face remote code of MoE transformers with the RMoE router: `configuration_undertow_rmoe.py`
and `modeling_undertow_rmoe.py`, copied as text into an exported directory (undertow/hf/remote.py)
and loaded by transformers with trust_remote_code. They import torch and transformers only, never
undertow, and are not imported by undertow itself."""
