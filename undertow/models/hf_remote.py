"""What a family without a stock transformers class declares so `undertow convert to-hf` can ship
its own modeling code (Hugging Face "remote code": `auto_map` + `trust_remote_code=True`).

A family's adapter (models/<family>/hf.py) sets `REMOTE_CODE = RemoteCode(...)` naming a package of
ours that holds two source files written for transformers:
    configuration_<name>.py   a PretrainedConfig subclass, model_type = <name>
    modeling_<name>.py        a PreTrainedModel + GenerationMixin subclass; it imports torch,
                              transformers and `.configuration_<name>` only, never undertow
undertow/hf/remote.py copies them into the exported directory as text and fills config.json's
`auto_map`, `model_type` and `architectures`. The family supplies its modeling source once; the
conversion of tensors and configs stays the adapter's `to_hf`/`from_hf`. Nothing here imports
anything of undertow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteCode:
    name: str           # model_type and file suffix, e.g. "undertow_depth"
    package: str        # the package of ours holding configuration_<name>.py and modeling_<name>.py
    config_class: str   # class name in configuration_<name>.py
    model_class: str    # class name in modeling_<name>.py (the AutoModelForCausalLM)

    @property
    def files(self) -> tuple[str, str]:
        return f"configuration_{self.name}.py", f"modeling_{self.name}.py"

    @property
    def auto_map(self) -> dict[str, str]:
        return {"AutoConfig": f"configuration_{self.name}.{self.config_class}",
                "AutoModelForCausalLM": f"modeling_{self.name}.{self.model_class}"}
