"""titans_memory's reference against lucidrains' titans-pytorch (`NeuralMemory`, the implementation the
Titans issue names), in a configuration where the two rules are the same function:

- store chunks of 1 token (their momentum and decay gates per token, as ours) and `batch_size = C`: their
  per-token gradients are all taken at the weights where each store call (a batch of C tokens) starts,
  which is our chunk-start rule with chunk_size = C (batch_size 1: the token-by-token rule);
- `pre_rmsnorm=False`, `mem_model_norm_add_residual=False`, one head: no norms around the memory and no
  head mixing, so the memory network is exactly M (their LayerNorm + residual wrapper is off);
- their loss is the mean over Dv of the squared error, weighted by their adaptive step: our theta is
  their step / Dv; their momentum and decay are sigmoids of per-token projections: our eta and alpha;
- the memory network: their `MemoryMLP` of depth 1 (x W) is our linear memory; for depth 2 a module
  with our residual SiLU MLP (x + silu(x W1) W2) replaces theirs (their MLP uses GELU and no residual).
With that, their read at token t uses the weights after token t (y_t = M_t(q_t)) like ours. Outputs,
final weights and momentum, and the gradients of the input sequence and of every parameter (the
projections, the gates and M_0, through their torch.func per-sample gradients and ours) are compared
in float64. Our q, k, v and gates are computed with their modules from the same sequence.

Skips unless titans-pytorch is importable (pip install titans-pytorch==0.5.5; it pulls tensordict,
x-transformers, einx, assoc-scan, hyper-connections and more, so it is not in the test extras)."""

import pytest
import torch
from torch import nn

titans_pytorch = pytest.importorskip(
    "titans_pytorch", reason="titans-pytorch is not installed (the oracle; pip install titans-pytorch==0.5.5)")

from tests.kernels.conftest import relative_error  # noqa: E402
from undertow.kernels.titans_memory.reference import titans_memory_reference  # noqa: E402


class ResidualSiLUMLP(nn.Module):
    """Our depth-2 memory network (rule.memory_forward) as a module their NeuralMemory can hold."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(dim, hidden) * dim ** -0.5),
                                         nn.Parameter(torch.randn(hidden, dim) * hidden ** -0.5)])

    def forward(self, x):
        return x + torch.nn.functional.silu(x @ self.weights[0]) @ self.weights[1]


def oracle(depth: int, D: int, chunk: int, seed: int):
    from titans_pytorch.memory_models import MemoryMLP

    torch.manual_seed(seed)
    model = MemoryMLP(D, depth=1) if depth == 1 else ResidualSiLUMLP(D, 2 * D)
    mem = titans_pytorch.NeuralMemory(dim=D, chunk_size=1, batch_size=chunk, heads=1, model=model, momentum=True,
                       mem_model_norm_add_residual=False, pre_rmsnorm=False)
    return mem.double()


def ours(mem, seq: torch.Tensor, chunk: int):
    """Our reference on the q, k, v and gates their modules compute from seq (B, T, D): y (B, T, D) and the
    final MemoryState. One head: (B, T, 1, D) and (B, T, 1)."""
    B, T, D = seq.shape
    head = lambda x: x.reshape(B, T, 1, -1)  # noqa: E731
    gate = lambda x: x.reshape(B, T, 1)  # noqa: E731
    theta = mem.adaptive_step_transform(mem.to_adaptive_step(seq)) / D  # their loss is a mean over Dv
    eta = mem.to_momentum(seq).sigmoid()[0]  # (b h, n, 1): momentum order 1
    alpha = mem.to_decay_factor(seq).sigmoid()
    y, state = titans_memory_reference(head(mem.to_queries(seq)), head(mem.to_keys(seq)), head(mem.to_values(seq)),
                                       gate(theta), gate(eta), gate(alpha), tuple(mem.memory_model_parameters),
                                       chunk_size=None if chunk == 1 else chunk, return_final_state=True)
    return y[:, :, 0], state


@pytest.mark.parametrize("depth, chunk, T", [(1, 4, 12), (1, 4, 11), (1, 1, 7), (2, 4, 10)])
def test_reference_equals_titans_pytorch(depth, chunk, T):
    B, D = 2, 8
    mem = oracle(depth, D, chunk, seed=depth * 10 + T)
    gen = torch.Generator().manual_seed(T)
    seq = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    cot = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    results = []
    for run in ("theirs", "ours"):
        leaf = seq.clone().requires_grad_()
        mem.zero_grad()
        if run == "theirs":
            y, state = mem(leaf)
            last_weights, last_momentum = state.states
            weights = [last_weights[name] for name in mem.memory_model_parameter_names]
            momentum = [last_momentum[name][0] for name in mem.memory_model_parameter_names]  # order 1
        else:
            y, state = ours(mem, leaf, chunk)
            weights, momentum = [w[:, 0] for w in state.weights], [s[:, 0] for s in state.momentum]
        (y * cot).sum().backward()
        grads = {name: p.grad.clone() for name, p in mem.named_parameters() if p.grad is not None}
        results.append((y.detach(), [w.detach() for w in weights], [s.detach() for s in momentum], leaf.grad, grads))
    (y1, w1, s1, gs1, g1), (y2, w2, s2, gs2, g2) = results
    errors = {"y": relative_error(y2, y1), "grad seq": relative_error(gs2, gs1)}
    errors.update({f"final W{i}": relative_error(b, a) for i, (a, b) in enumerate(zip(w1, w2))})
    errors.update({f"final S{i}": relative_error(b, a) for i, (a, b) in enumerate(zip(s1, s2))})
    assert g1.keys() == g2.keys(), f"parameters with a gradient differ: {sorted(g1)} vs {sorted(g2)}"
    errors.update({f"grad {name}": relative_error(g2[name], g1[name]) for name in g1})
    bad = {k: e for k, e in errors.items() if not e <= 1e-10}
    assert not bad, f"relative errors above 1e-10: {bad}"


def test_the_chunk_start_rule_is_what_matches():
    """The comparison can fail: the token-by-token rule (chunk 1) differs from their batch of 4."""
    mem = oracle(1, 8, 4, seed=3)
    seq = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        theirs, _ = mem(seq)
        assert relative_error(ours(mem, seq, 4)[0], theirs) <= 1e-10
        assert relative_error(ours(mem, seq, 1)[0], theirs) > 1e-3
