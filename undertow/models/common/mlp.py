"""Feed-forward blocks: SwiGLU (Llama) and the 2-matrix GELU MLP (GPT-2, Megatron-LM's default)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from undertow.kernels.swiglu import swiglu


def swiglu_hidden(d_model: int, multiple_of: int) -> int:
    """Llama's default width: 2/3 of 4*d_model, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). x: (..., d_model) -> (..., d_model).

    gate and up are separate projections so tensor parallelism can shard them column-wise. The
    activation is kernels/swiglu (one native pass each way on CPU float32).
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class GeluMLP(nn.Module):
    """fc2(gelu(fc1(x))) with the exact (erf) GELU and no biases: Megatron-LM's default MLP
    (linear_fc1, linear_fc2 under --disable-bias-linear). x: (..., d_model) -> (..., d_model)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.fc1.weight, std=std)
        nn.init.normal_(self.fc2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))
