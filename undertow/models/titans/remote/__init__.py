"""The Hugging Face remote code of the Titans family: `configuration_undertow_titans.py` and
`modeling_undertow_titans.py`, copied as text into an exported directory (undertow/hf/remote.py)
and loaded by transformers with trust_remote_code. They import torch and transformers only, never
undertow, and are not imported by undertow itself."""
