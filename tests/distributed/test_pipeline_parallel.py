"""Pipeline parallelism: loss and every parameter gradient of one step equal the single-process
step, for every family and schedule; through the Trainer (zero_bubble, zbv) the validation too, and
each resumes its own checkpoint exactly; checkpoints reshard between pp and one process; tied
embeddings stay equal across the first and last stage over optimizer steps; stages may carry more
than one tensor. (Every family under pp2 and tp2 x pp2 through the Trainer: test_data_parallel.py.)"""

import pytest
import torch
from torch import nn

from tests.distributed.harness import run_distributed
from tests.distributed.layouts import advance, save_and_resume
from undertow.models import registry
from undertow.models.common.lm import CausalLMShell
from undertow.models.common.loss import IGNORE_INDEX, lm_loss_sum
from undertow.models.common.norms import RMSNorm
from undertow.models.mamba.config import MambaConfig
from undertow.models.transformer.config import TransformerConfig
from undertow.parallel.mesh import ParallelDims
from undertow.parallel.pipeline import SCHEDULES, PipelineRunner
from undertow.pretrain.config import load_config
from undertow.pretrain.trainer import Trainer

VOCAB, ROWS, SEQ = 64, 4, 16
FAMILIES = {  # four layers each: two stages of two, or four virtual stages of one
    "transformer": lambda tie: TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, multiple_of=16,
                                                 tie_embeddings=tie),
    "mamba1": lambda tie: MambaConfig(vocab_size=VOCAB, d_model=32, layer_pattern="mmmm", d_state=4,
                                      tie_embeddings=tie),
    "mamba2": lambda tie: MambaConfig(vocab_size=VOCAB, d_model=32, layer_pattern="MMMM", d_state=8, headdim=16,
                                      chunk_size=8, tie_embeddings=tie),
    "hybrid": lambda tie: MambaConfig(vocab_size=VOCAB, d_model=32, layer_pattern="mM*-", d_state=8, headdim=16,
                                      chunk_size=8, n_heads=2, multiple_of=16, tie_embeddings=tie),
}
# (schedule, virtual stages per rank, micro-batches)
SCHEDULE_CASES = [("1f1b", 1, 2), ("interleaved_1f1b", 2, 2), ("zero_bubble", 2, 2), ("zbv", 2, 2), ("gpipe", 1, 4)]


def batch() -> dict:
    """Fixed rows with document boundaries inside them and some ignored labels."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=gen)
    labels = ids[:, 1:].clone()
    labels[0, :3] = IGNORE_INDEX
    doc_ids = ((torch.arange(SEQ) >= 5).int() + (torch.arange(SEQ) >= 12).int()).expand(ROWS, SEQ).clone()
    doc_ids[1] = 0
    # positions restart at each document, as the loader writes them
    starts = torch.cat([torch.ones(ROWS, 1, dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    last_start = torch.cummax(torch.where(starts, torch.arange(SEQ), 0), dim=1).values
    position_ids = torch.arange(SEQ) - last_start
    return {"input_ids": ids[:, :-1], "labels": labels, "doc_ids": doc_ids, "position_ids": position_ids}


def build(cfg) -> nn.Module:
    torch.manual_seed(0)
    model = registry.build_model(cfg) if not isinstance(cfg, dict) else TwoStreamLM(cfg["cfg"])
    model.init_weights()
    return model


def n_labels(b: dict) -> int:
    return int((b["labels"] != IGNORE_INDEX).sum())


def single_step(cfg) -> tuple[float, float, dict]:
    """(loss, loss sum, gradients) of the one-process step."""
    model = build(cfg)
    b = batch()
    loss_sum = lm_loss_sum(model(b["input_ids"], doc_ids=b["doc_ids"], position_ids=b["position_ids"]), b["labels"])
    loss = loss_sum / n_labels(b)
    loss.backward()
    return loss.item(), loss_sum.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def pipeline_step(world, cfg, schedule, virtual, microbatches) -> tuple[float, float, dict, float]:
    """(loss, grad norm, this rank's gradients, forward-only loss sum) of a pipelined step."""
    model = build(cfg)
    dims = ParallelDims(pp=world)
    # the two-stream test model borrows the transformer's spec (only its layer costs are read)
    spec = registry.get("transformer" if isinstance(cfg, dict) else registry.family_of(cfg))
    runner = PipelineRunner(model, spec, dims, dims.build_mesh("cpu"), schedule=schedule, microbatches=microbatches,
                            virtual_stages=virtual, seq_len=SEQ)
    b = batch()
    # two loader micro-batches of two rows; the schedule re-splits them into `microbatches`
    micro = [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    loss, grad_norm = runner.train_step(micro, n_labels(b))
    grads = {n: p.grad.clone() for n, p in runner.model.named_parameters()}
    # forward only (validation); under zbv through the runner's own send/recv chain
    loss_sum = float(runner.loss_sum(b))
    return float(loss), grad_norm, grads, loss_sum


def train_tied(world, steps) -> tuple[list[float], torch.Tensor]:
    """Losses of `steps` AdamW steps of the tied hybrid, and this rank's copy of the tied weight."""
    model = build(FAMILIES["hybrid"](True))
    dims = ParallelDims(pp=world)
    runner = PipelineRunner(model, registry.get("mamba"), dims, dims.build_mesh("cpu"), schedule="1f1b",
                            microbatches=2, seq_len=SEQ)
    optimizer = torch.optim.AdamW(runner.model.parameters(), lr=1e-2, weight_decay=0.1)
    b = batch()
    losses = []
    for _ in range(steps):
        loss, _ = runner.train_step([b], n_labels(b), grad_clip=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    tied = runner.model.embed.weight if runner.has_first else runner.model.lm_head.weight
    return losses, tied.detach().clone()


def step_cases() -> list[tuple[str, str, int, int]]:
    """(family, schedule, virtual stages per rank, micro-batches) checked against one process."""
    cases = []
    for family in sorted(FAMILIES):
        for schedule, virtual, microbatches in SCHEDULE_CASES:
            if schedule in SCHEDULES and (family == "hybrid" or schedule not in ("gpipe", "zbv")):
                cases.append((family, schedule, virtual, microbatches))
    return cases


def trainer_config(run_dir: str, layout: list[str]):
    return load_config("tiny-hybrid", [
        "--model.d_model", "32", "--model.layer_pattern", "mM*-", "--model.d_state", "8", "--model.headdim", "16",
        "--model.chunk_size", "8", "--training.run_dir", run_dir, "--data.seq_len", str(SEQ),
        "--training.micro_batch_size", "2", "--training.grad_accum_steps", "2", "--training.val_batches", "1",
        "--training.val_every", "0", "--logging.tensorboard", "false", "--data.num_workers", "0", *layout,
    ])


def trainer_step(run_dir: str, layout: list[str]) -> tuple[float, float, int, dict, float, list[str]]:
    """Through the Trainer: (loss, grad norm, labels, gradients, validation loss) of one step on batch(),
    then the AdamW step, a save and a restart in the layout: the names not resumed exactly."""
    layout = layout + ["--checkpoint.resume", "auto"]
    trainer = Trainer(trainer_config(run_dir, layout))
    b = batch()
    b["input_ids"] %= trainer.cfg.model.vocab_size
    micro = [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    loss, grad_norm, labels = trainer.train_step(micro)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    val_loss = trainer.validate()
    advance(trainer)
    _, not_resumed = save_and_resume(trainer, trainer_config(run_dir, layout))
    return loss, grad_norm, labels, grads, val_loss, not_resumed


def train_steps(run_dir: str, layout: list[str], steps: int, save_at: int | None = None) -> dict:
    """Resume from run_dir's latest checkpoint (if any), train to `steps` on batch() (saving at
    `save_at`); return this rank's parameters and AdamW moments by name."""
    trainer = Trainer(trainer_config(run_dir, layout + ["--checkpoint.resume", "auto"]))
    b = batch()
    b["input_ids"] %= trainer.cfg.model.vocab_size
    while trainer.step < steps:
        trainer.train_step([b])
        advance(trainer)
        if trainer.step == save_at:
            trainer.save()
    state = {}
    for name, p in trainer.model.named_parameters():
        moments = trainer.optimizer.state[p]
        state[name] = [p.detach().clone(), moments["exp_avg"].clone(), moments["exp_avg_sq"].clone()]
    return state


PP_TRAINER = ["--parallel.pp", "2", "--parallel.pp_schedule", "zero_bubble", "--parallel.pp_virtual_stages", "2"]
PP_TRAINER_ZBV = ["--parallel.pp", "2", "--parallel.pp_schedule", "zbv", "--parallel.pp_virtual_stages", "2"]


def _everything(rank, world, run_dir):
    """All pipelined runs of this file in one pair of processes (starting them is the slow part)."""
    out = {"steps": {}, "trainer": trainer_step(f"{run_dir}/step", PP_TRAINER),
           "trainer_zbv": trainer_step(f"{run_dir}/step_zbv", PP_TRAINER_ZBV)}
    # checkpoints: one process wrote step 1 to single/, pp loads it; pp writes step 1 to pp/
    out["loaded_from_single"] = train_steps(f"{run_dir}/single", ["--parallel.pp", "2"], 1)
    out["saved"] = train_steps(f"{run_dir}/pp", ["--parallel.pp", "2"], 1, save_at=1)
    for family, schedule, virtual, microbatches in step_cases():
        out["steps"][family, schedule] = pipeline_step(world, config(family), schedule, virtual, microbatches)
    out["two_stream"] = pipeline_step(world, TWO_STREAM, "interleaved_1f1b", 2, 2)
    out["tied"] = train_tied(world, 3)
    return out


def config(family: str):
    return FAMILIES[family](family != "transformer")  # tied heads synced across ranks, and an untied one


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pp"))


@pytest.fixture(scope="module")
def single_saved(run_dir):
    return train_steps(f"{run_dir}/single", [], 1, save_at=1)  # a one-process checkpoint for pp to load


@pytest.fixture(scope="module")
def runs(run_dir, single_saved):
    return run_distributed(_everything, 2, run_dir, retry_crash=False)


def assert_same_state(parts: list[dict], whole: dict):
    """The pp ranks' parameters and moments (parts) are exactly the one process's (whole)."""
    seen = set()
    for part in parts:
        for name, tensors in part.items():
            for got, want in zip(tensors, whole[name]):
                assert torch.equal(got, want), name
            seen.add(name)
    assert seen == set(whole)


def test_checkpoints_reshard_between_pp_and_one_process(runs, run_dir, single_saved):
    """A one-process checkpoint loads under pp = 2 and a pp = 2 checkpoint in one process: the
    parameters and AdamW moments are the writer's, the tied embedding under one name."""
    assert_same_state([r["loaded_from_single"] for r in runs], single_saved)
    loaded = train_steps(f"{run_dir}/pp", [], 1)
    assert_same_state([r["saved"] for r in runs], loaded)
    trained = train_steps(f"{run_dir}/pp", [], 2)  # and it trains on
    assert not torch.equal(trained["embed.weight"][0], loaded["embed.weight"][0])


@pytest.mark.parametrize("key", ["trainer", "trainer_zbv"])
def test_trainer_step_equals_single_process(runs, tmp_path, key):
    """zero_bubble, and zbv (validation through the runner's forward chain); each resumes its own save."""
    loss, grad_norm, labels, grads, val_loss, not_resumed = trainer_step(str(tmp_path), [])
    assert not_resumed == []
    seen = set()
    for pp_loss, pp_norm, pp_labels, pp_grads, pp_val, pp_not_resumed in (r[key] for r in runs):
        assert pp_not_resumed == []  # every parameter and AdamW moment of this rank's stages as saved
        assert pp_labels == labels and pp_loss == pytest.approx(loss, rel=1e-5)
        assert pp_norm == pytest.approx(grad_norm, rel=1e-4)
        assert pp_val == pytest.approx(val_loss, rel=1e-5)
        for name, g in pp_grads.items():
            ref = grads["embed.weight" if name == "lm_head.weight" else name]  # tied
            assert ((g - ref).norm() / ref.norm()).item() < 1e-4, name
            seen.add(name)
    assert seen >= set(grads)


def check_against_single(cfg, results, tie: bool):
    ref_loss, ref_loss_sum, ref_grads = single_step(cfg)
    ref_norm = torch.cat([g.flatten() for g in ref_grads.values()]).norm().item()
    seen = set()
    for loss, grad_norm, grads, loss_sum in results:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert loss_sum == pytest.approx(ref_loss_sum, rel=1e-5)
        assert grad_norm == pytest.approx(ref_norm, rel=1e-4)
        for name, g in grads.items():
            ref_name = "embed.weight" if tie and name == "lm_head.weight" else name
            ref = ref_grads[ref_name]
            err = ((g - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            assert err < 1e-4, f"{name}: relative error {err:.2e}"
            seen.add(ref_name)
    assert seen == set(ref_grads), f"parameters no stage holds: {set(ref_grads) - seen}"


@pytest.mark.parametrize("family,schedule,virtual,microbatches", step_cases(),
                         ids=[f"{c[0]}-{c[1]}" for c in step_cases()])
def test_pipeline_step_equals_single_process(runs, family, schedule, virtual, microbatches):
    check_against_single(config(family), [r["steps"][family, schedule] for r in runs], family != "transformer")


def test_zero_bubble_schedules_are_available():
    """torch >= 2.6 has them; if this fails, the zero-bubble cases above were silently not run."""
    assert {"zero_bubble", "zbv"} <= set(SCHEDULES)


def test_tied_embeddings_stay_in_sync(runs):
    (losses, first_copy), (losses_1, last_copy) = runs[0]["tied"], runs[1]["tied"]
    assert losses == losses_1 and losses[-1] < losses[0]
    initial = build(config("hybrid")).embed.weight.detach()
    assert not torch.equal(first_copy, initial)  # it trained
    assert torch.equal(first_copy, last_copy)


def test_stages_carry_two_tensors(runs):
    check_against_single(TWO_STREAM, [r["two_stream"] for r in runs], tie=False)


class TwoStreamBlock(nn.Module):
    """x, s -> x + mlp(norm(x)) * sigmoid(s), s + x: a second stream that crosses stage boundaries."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = RMSNorm(d, 1e-5)
        self.proj = nn.Linear(d, d, bias=False)

    def init_weights(self, std, out_std):
        self.norm.init_weights()
        nn.init.normal_(self.proj.weight, std=std)

    def forward(self, x, s):
        return x + self.proj(self.norm(x)) * torch.sigmoid(s), s + 0.5 * x


class TwoStreamLM(CausalLMShell):
    """A test shell whose blocks carry two tensors (like router or recurrent-depth state)."""

    def __init__(self, cfg):
        super().__init__(cfg, (TwoStreamBlock(cfg.d_model) for _ in range(cfg.n_layers)))

    def layer_context(self, input_shape, device, **side):
        return {}

    def embed_stage(self, input_ids, ctx):
        x = self.embed(input_ids)
        return x, torch.zeros_like(x)

    def run_layer(self, layer, carried, ctx):
        return layer(*carried)

    def head_stage(self, carried):
        return self.lm_head(self.norm(carried[0] + carried[1]))


TWO_STREAM = {"cfg": TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=4, n_heads=2, tie_embeddings=False)}
