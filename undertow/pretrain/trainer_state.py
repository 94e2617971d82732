"""The Trainer's state on disk and its guard (a mixin of Trainer, trainer.py): resume and
init_from (verified, falling back past damaged checkpoints), save (with the loader states of every
data-parallel rank), and the check after each step that stops a run before poisoned weights are
computed with or saved (nan_guard.py).
"""

from __future__ import annotations

import math

import torch.distributed as dist

from undertow.log import get_logger
from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain.config import build_model_config
from undertow.pretrain.nan_guard import parameters_norm, resume_command

log = get_logger("undertow.trainer")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or a step made the parameters non-finite; the message
    names the last good checkpoint (protected from pruning) and the command that resumes from it."""


class RunState:
    """Methods of Trainer that read and write the run's state; they use the Trainer's attributes
    (cfg, model, optimizer, train_loader, step, counters, good_ckpts, world_size, dp_rank)."""

    def _adopt_init_model(self) -> dict:
        """With checkpoint.init_from, the model is the checkpoint's: take its model config."""
        meta = ckpt.read_meta(self.cfg.checkpoint.init_from)
        model_cfg = build_model_config(meta["config"]["model"])
        if self.cfg.model != model_cfg:
            log.warning("checkpoint.init_from: using the checkpoint's model config %s", meta["config"]["model"])
        self.cfg.model = model_cfg
        return meta

    def _maybe_resume(self) -> str | None:
        resume, root = self.cfg.checkpoint.resume, self.cfg.checkpoint_dir
        if resume == "none":
            if ckpt.latest_checkpoint(root):
                raise RuntimeError(
                    f"{root} already holds checkpoints; resume them (checkpoint.resume=auto) or use a new training.run_dir"
                )
            return None
        verify = self.cfg.checkpoint.verify
        if resume == "auto":  # the newest good checkpoint; damaged newer ones are set aside
            found = ckpt.load_newest_good(root, self.model, self.optimizer, verify, self._check_same_model)
            if found is None:
                return None
            path, meta = found
        else:  # a path the user named: a damaged one stops the run, and stays where it is
            path, meta = resume, ckpt.load_verified(resume, self.model, self.optimizer, verify, self._check_same_model)
        self.step = meta["step"]
        self.skipped_total = meta["skipped_total"]
        self.consecutive_bad = meta["consecutive_bad"]
        self.last_val_loss = meta.get("last_val_loss")
        # this rank's loader state, or, after a change of data-parallel degree, every saved rank's
        # streams dealt over this run's ranks (no document skipped or repeated; see PackedLoader.resume_from)
        self.train_loader.resume_from(meta.get("loaders", [meta["loader"]]))
        ckpt.set_rng_state(meta["rng"])
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def _check_same_model(self, path: str, meta: dict) -> None:
        """Refuse a checkpoint of another model config before loading it (not damage: it stays)."""
        saved_model = meta["config"]["model"]
        current = self.cfg.to_dict()["model"]
        if saved_model != current:
            raise RuntimeError(f"checkpoint {path} was trained with model {saved_model}, the config asks for {current}")
        self._check_same_tokenizer(path, meta)

    def _check_same_tokenizer(self, path: str, meta: dict) -> None:
        """Refuse a checkpoint whose tokenizer (recorded sha256 and vocabulary size) is not the data's:
        its token ids would mean other pieces of text. Either side unknown: a warning."""
        saved, mine = meta.get("tokenizer"), self.vocab
        if not saved or not mine:
            if saved != mine:
                log.warning("checkpoint %s: cannot compare tokenizers (checkpoint %s, data %s)", path,
                            _describe(saved), _describe(mine))
            return
        if (saved.get("sha256"), saved.get("vocab_size")) != (mine.get("sha256"), mine.get("vocab_size")):
            raise ValueError(f"checkpoint {path} was trained with tokenizer {_describe(saved)}, the data "
                             f"({', '.join(self.cfg.data.sources)}) is tokenized with {_describe(mine)}: "
                             "prepare the data with the checkpoint's tokenizer, or start from scratch")

    def _loader_states(self) -> list[dict]:
        """Every data-parallel rank's loader state, indexed by dp rank (tp/cp peers share one)."""
        state = self.train_loader.state_dict()
        if self.world_size == 1:
            return [state]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, (self.dp_rank, state))
        return [s for _, s in sorted(dict(gathered).items())]

    def save(self) -> str:
        loaders = self._loader_states()
        meta = {
            "config": self.cfg.to_dict(),
            "loader": loaders[0],
            "loaders": loaders,
            "layout": self.dims.describe(),
            "rng": ckpt.rng_state(),
            "skipped_total": self.skipped_total,
            "consecutive_bad": self.consecutive_bad,
            "last_val_loss": self.last_val_loss,
            "tokenizer": self.vocab,
        }
        path = ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.step, self.model, self.optimizer, meta,
                                    self.cfg.checkpoint.keep_last, protect=self.good_ckpts.good,
                                    size_hint=self.checkpoint_bytes)
        self.good_ckpts.saved(path)
        return path

    def _check_step_kept_weights(self, before: float, lr: float, grad_norm: float) -> float:
        """The parameters' norm after an applied step; a step that made them non-finite or blew them up
        stops the run before anything is computed or saved from them (one fused norm, one sync)."""
        after = parameters_norm(self.model.parameters(), self.world_size > 1)
        growth = self.cfg.training.max_param_growth
        what = None
        if not math.isfinite(after):
            what = "made the parameters non-finite"
        elif growth and before > 0 and after > growth * before:
            what = f"multiplied the parameter norm by {after / before:.3g} (training.max_param_growth = {growth:g})"
        if what:
            raise self._diverged(f"step {self.step} (lr {lr:.3g}, grad norm {grad_norm:.4g}) {what}")
        return after

    def _diverged(self, reason: str) -> TrainingDiverged:
        """The error that stops a poisoned run: pending checkpoints (of the poisoned weights) set aside, the
        last good one named with the command that resumes from it."""
        aside = self.good_ckpts.poisoned()
        good = self.good_ckpts.good
        where = f"the last good checkpoint is {good}" if good else "no checkpoint holds weights from before it"
        moved = f"; set aside (poisoned weights, never resumed): {', '.join(aside)}" if aside else ""
        return TrainingDiverged(
            f"{reason}; {where}{moved}. Lower optimizer.lr (or check the data) and "
            f"{'resume' if good else 'start over'}: {resume_command(good, self.cfg.optimizer.lr)}"
        )

    # ----------------------------------------------------------------- steps


def _describe(tokenizer: dict | None) -> str:
    if not tokenizer:
        return "unknown (none recorded)"
    return f"sha256 {str(tokenizer.get('sha256'))[:12]}... vocab {tokenizer.get('vocab_size')}"
