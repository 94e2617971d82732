"""ModelSpec: what the framework needs to know about one model family (see registry.py).

Each family's `models/<family>/spec.py` builds one; this module imports nothing of undertow, so a
family's spec never has to import the registry that loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ModelSpec:
    """What the framework needs to know about one model family.

    config_cls:      dataclass of the family's hyper-parameters, with `validate()`.
    model_cls:       nn.Module built as `model_cls(config)`; it must offer `init_weights()`
                     (so it can be built on the meta device and materialized later) and
                     `forward(input_ids, *, position_ids, doc_ids, cu_seqlens, max_seqlen) -> logits`.
    flops_per_token: (config, seq_len) -> training FLOPs per token (forward + backward), for MFU.
    layer_cost:      (config, seq_len) -> relative cost per layer (pipeline balancing), or None.
    plan:            the family's tensor/sequence-parallel plan module (models/<family>/plan.py:
                     block_styles, block_params; applied by parallel/tensor.py), or None.
    hf_adapter:      Hugging Face conversion module, or None.
    shape_limits:    (config) -> [(degree, what, size)]: the model dimensions a parallel degree
                     splits ("tp" must divide e.g. ("n_heads", 32)), for ParallelDims.validate and
                     the planner; or None (no limits known).
    state_elements:  (config) -> per layer, the elements (float32) of the recurrent state one
                     sequence carries across a split of its tokens (conv window + SSM state; 0
                     for layers without one), for the planner's context-parallel memory; or None.
    step_flops_per_token: (config, seq_len, step) -> training FLOPs per token of training step
                     `step` (0-based), for families whose compute changes from step to step (a
                     depth drawn per step); the trainer's MFU then counts what each step spent.
                     None: every step costs flops_per_token.
    """

    name: str
    config_cls: type
    model_cls: type
    flops_per_token: Callable[[Any, int], float]
    layer_cost: Callable[[Any, int], list[float]] | None = None
    plan: Any = None
    hf_adapter: Any = None
    shape_limits: Callable[[Any], list[tuple[str, str, int]]] | None = None
    state_elements: Callable[[Any], list[int]] | None = None
    step_flops_per_token: Callable[[Any, int, int], float] | None = None
