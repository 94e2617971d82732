"""What a recipe's model keeps in memory for its backward pass, measured on the meta device.

Works for any family: nothing here knows what the blocks are. The model is built on the meta
device (no memory, so a 7B model profiles in seconds) and its training forward (model + the LM
loss) runs under `torch.autograd.graph.saved_tensors_hooks`. Every tensor autograd saves for the
backward is counted once per storage (views of one storage count once; parameters not at all)
and charged to the piece of the model that was running when it was saved:

    pre      before the first block (embedding lookup)
    block i  `model.layers[i]`
    post     after the last block (final norm, LM head, loss)

Each piece is measured at three (batch, seq_len) points and fitted as

    saved_bytes(b, T) = per_microbatch + b * (per_sequence + per_token * T)

per_token is what grows with the tokens of a micro-batch (activations, chunk states);
per_microbatch is what a micro-batch's graph holds whatever its size (e.g. the bf16 copies of the
weights that autocast saves for the backward). The input of every block is recorded too: it is
what activation checkpointing keeps.

Measured as it runs on the meta device, with two stand-ins stated here:
- compute dtype: on GPU the trainer keeps float32 parameters under bf16 autocast. Autocast does
  not act on meta tensors, so `_MetaTraining` emulates its rule: the inputs of the matmul-like ops
  (linear, matmul, mm, bmm, addmm, baddbmm, einsum, conv1d, attention) are cast to the compute dtype
  (leaf parameters cast once per forward, like autocast's cache); everything else runs in the dtype
  it is given, and `torch.is_autocast_enabled("meta")` / `torch.get_autocast_dtype("meta")` answer
  as autocast would. With float32 (CPU) nothing is cast and autocast reads as off.
- attention: meta tensors take SDPA's math path, which would store T x T scores; the GPU runs a
  fused (flash) kernel, which saves q, k, v, the output and a float32 log-sum-exp per query (as
  CPU's fused SDPA does). `_FusedAttention` stands in for it with exactly those saved tensors.
- the kernels run their PyTorch (chunked) form on meta; the Triton forms save the same inputs and
  per-chunk states (see kernels/*/triton.py), not more.

Blocks with the same class and parameter shapes are taken to save the same bytes: the first of
each kind runs, its repeats pass their input through (when the first returned a tensor shaped
like its input), which keeps a 64-layer model's profile to one block per kind.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from undertow.models.common.lm import CausalLMShell
from undertow.models.common.loss import lm_loss_sum

# The ops autocast runs in lower precision (the matmul family); everything else keeps its dtype.
_LOWER_PRECISION_OPS = {
    F.linear, torch.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
    torch.addmm, torch.baddbmm, torch.einsum, F.conv1d,
}
BASE_LEN = 256  # profile lengths BASE_LEN and 2 * BASE_LEN: multiples of every chunk size we ship


@dataclasses.dataclass
class Piece:
    """One part of the model: what it owns and what it saves for the backward (bytes)."""

    name: str
    params: frozenset[int]  # ids of the parameters it uses (a tied weight is in every piece using it)
    per_microbatch: float = 0.0
    per_sequence: float = 0.0
    per_token: float = 0.0
    input_per_token: float = 0.0  # bytes of the block's input per token (blocks only)

    def saved_bytes(self, batch: int, seq_len: int) -> float:
        """Bytes saved for the backward by one micro-batch of `batch` rows of `seq_len` tokens."""
        return self.per_microbatch + batch * (self.per_sequence + self.per_token * seq_len)

    def input_bytes(self, batch: int, seq_len: int) -> float:
        return self.input_per_token * batch * seq_len


@dataclasses.dataclass
class ModelProfile:
    pieces: list[Piece]  # pre, block 0 .. block L-1, post
    numel: dict[int, int]  # parameter id -> elements
    compute_dtype: torch.dtype
    # the post piece as the trainer's fused head loss runs it (model(ids, labels=...)): the hidden
    # states' and the head weight's gradients instead of the logits; None where not profiled
    fused_post: Piece | None = None

    def post(self, fused: bool) -> Piece:
        """The post piece of a run with (fused) or without the fused head loss."""
        return self.fused_post if fused and self.fused_post is not None else self.pieces[-1]

    @property
    def blocks(self) -> list[Piece]:
        return self.pieces[1:-1]

    def parameters(self, pieces: list[Piece]) -> tuple[int, int]:
        """(elements, tensors) of the distinct parameters the pieces use."""
        ids = frozenset().union(*(p.params for p in pieces))
        return sum(self.numel[i] for i in ids), len(ids)

    def saved_bytes(self, batch: int, seq_len: int, fused: bool = False) -> float:
        """Everything one micro-batch's forward keeps for the backward (no checkpointing)."""
        pieces = self.pieces[:-1] + [self.post(fused)]
        return sum(p.saved_bytes(batch, seq_len) for p in pieces)


class _FusedAttention(torch.autograd.Function):
    """Stand-in for a fused attention kernel on meta tensors: saves what flash attention saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the planner's attention stand-in measures memory; it has no backward")


class _MetaTraining(TorchFunctionMode):
    """Autocast's cast rule for the matmul family (see the module docstring), and fused attention."""

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.dtype = compute_dtype
        self.cache: dict[int, torch.Tensor] = {}

    def _cast(self, x):
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v) for v in x)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == self.dtype:
            return x
        if x.is_leaf and x.requires_grad:  # a parameter: one cast per forward (autocast's cache)
            if id(x) not in self.cache:
                self.cache[id(x)] = x.to(self.dtype)
            return self.cache[id(x)]
        return x.to(self.dtype)

    def __enter__(self):
        # Model code may ask whether autocast is on (e.g. to pick a norm's output dtype); on meta
        # torch cannot answer, so the emulation answers for the meta device while it is active.
        self._real = torch.is_autocast_enabled, torch.get_autocast_dtype
        enabled, dtype = self.dtype != torch.float32, self.dtype
        is_enabled, get_dtype = self._real
        torch.is_autocast_enabled = lambda *a: enabled if a and str(a[0]) == "meta" else is_enabled(*a)
        torch.get_autocast_dtype = lambda device: dtype if str(device) == "meta" else get_dtype(device)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.is_autocast_enabled, torch.get_autocast_dtype = self._real
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (self._cast(t) for t in args[:3])
            return _FusedAttention.apply(q, k, v)
        if func in _LOWER_PRECISION_OPS:
            args, kwargs = self._cast(args), {key: self._cast(v) for key, v in kwargs.items()}
        return func(*args, **kwargs)


def _signature(block: nn.Module) -> tuple:
    return (type(block).__qualname__, tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()))


def _measure(model: nn.Module, batch: int, seq_len: int, compute_dtype: torch.dtype, fused: bool = False):
    """One meta forward + loss (`fused`: the model's fused head loss, model(ids, labels=ids)).
    Returns (saved bytes per piece, input bytes per block, param ids per piece)."""
    blocks = model.layers
    n = len(blocks)
    phase = [0]  # index into pieces: 0 pre, 1 + i block i, n + 1 post
    saved = [0] * (n + 2)
    inputs = [0] * n
    used: list[set[int]] = [set() for _ in range(n + 2)]
    param_storage = {p.untyped_storage()._cdata: id(p) for p in model.parameters()}
    seen: set[int] = set()
    keep: list = []  # holds every counted storage, so no address is reused during the forward
    handles = []

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in param_storage:
            used[phase[0]].add(param_storage[key])
        elif key not in seen:
            seen.add(key)
            keep.append(storage)
            saved[phase[0]] += storage.nbytes()
        return t

    def enter(i):
        def hook(module, args):
            phase[0] = 1 + i
            inputs[i] = args[0].numel() * args[0].element_size()
        return hook

    def leave(module, args, output):
        phase[0] = n + 1

    def owner(module, args):
        used[phase[0]].update(id(p) for p in module.parameters(recurse=False))

    in_blocks = {id(m) for b in blocks for m in b.modules()}
    for i, block in enumerate(blocks):
        handles += [block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave)]
    for module in model.modules():
        if id(module) not in in_blocks and next(module.parameters(recurse=False), None) is not None:
            handles.append(module.register_forward_pre_hook(owner))

    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    try:
        with _MetaTraining(compute_dtype), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids) if fused else lm_loss_sum(model(ids), ids)
        del loss
    finally:
        for h in handles:
            h.remove()
    for i, block in enumerate(blocks):
        used[1 + i].update(id(p) for p in block.parameters())
    return saved, inputs, used


def _skip_repeats(blocks: nn.ModuleList) -> list[int]:
    """Make each block that repeats an earlier one (same class and parameter shapes) pass its input
    through, once the first of its kind has shown that it returns a tensor shaped like its input.
    Returns, per block, the index of the block whose measurement it takes."""
    first: dict[tuple, int] = {}
    same_shape: dict[int, bool] = {}
    source = []
    for i, block in enumerate(blocks):
        sig = _signature(block)
        if sig not in first:
            first[sig] = i
            source.append(i)

            def record(module, args, output, i=i):
                same_shape[i] = (
                    isinstance(output, torch.Tensor) and output.shape == args[0].shape and output.dtype == args[0].dtype
                )

            block.register_forward_hook(record)
            continue
        rep, real_forward = first[sig], block.forward
        source.append(rep)

        def passthrough(*args, rep=rep, real_forward=real_forward, **kwargs):
            return args[0] if same_shape.get(rep) else real_forward(*args, **kwargs)

        block.forward = passthrough
    return source


def _fit(name: str, points: list[list[float]], m: int, base_len: int, params: frozenset) -> Piece:
    """Piece `name` from its saved bytes at (1, base_len), (1, 2 base_len), (2, base_len) (index m)."""
    s11, s12, s21 = (p[m] for p in points)
    per_token = (s12 - s11) / base_len
    per_batch_row = s21 - s11  # per_sequence + per_token * base_len
    return Piece(name=name, params=params, per_microbatch=s11 - per_batch_row,
                 per_sequence=per_batch_row - per_token * base_len, per_token=per_token)


def profile_model(model_cls, model_config, compute_dtype: torch.dtype = torch.float32, base_len: int = BASE_LEN,
                  fused_loss: bool = False) -> ModelProfile:
    """Build `model_cls(model_config)` on the meta device and fit every piece's saved bytes (see the
    module docstring). The model must have its blocks in `model.layers` (an nn.ModuleList).
    `fused_loss`: also profile the post piece under the fused head loss (`ModelProfile.fused_post`),
    for models whose forward takes labels (CausalLMShell)."""
    with torch.device("meta"):
        model = model_cls(model_config)
    model.train()
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList; the planner profiles blocks by it")
    source = _skip_repeats(model.layers)
    points = {(1, base_len): None, (1, 2 * base_len): None, (2, base_len): None}
    for b, t in points:
        points[(b, t)] = _measure(model, b, t, compute_dtype)
    (s11, in11, used), (s12, _, _), (s21, _, _) = points.values()
    n = len(model.layers)
    pieces = []
    for k in range(n + 2):
        name = "pre" if k == 0 else "post" if k == n + 1 else f"block {k - 1}"
        m = k if k in (0, n + 1) else 1 + source[k - 1]  # repeats take their first's numbers
        piece = _fit(name, [s11, s12, s21], m, base_len, frozenset(used[k]))
        if 0 < k <= n:
            piece.input_per_token = in11[k - 1] / base_len
        pieces.append(piece)
    fused_post = None
    if fused_loss and isinstance(model, CausalLMShell):
        saved = [_measure(model, b, t, compute_dtype, fused=True) for b, t in points]
        fused_post = _fit("post", [x[0] for x in saved], n + 1, base_len, frozenset(saved[0][2][n + 1]))
    numel = {id(p): p.numel() for p in model.parameters()}
    return ModelProfile(pieces=pieces, numel=numel, compute_dtype=compute_dtype, fused_post=fused_post)
