"""`undertow convert from-deepspeed`'s work: a DeepSpeed ZeRO checkpoint -> an undertow checkpoint.

Lives in pretrain/ (beside checkpoint.py, whose format it writes) rather than parallel/deepspeed.py,
so that parallel/ never imports the trainer's floor.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from undertow.log import get_logger
from undertow.models import registry
from undertow.parallel.deepspeed import import_deepspeed
from undertow.pretrain.checkpoint import replacing_directory, write_meta
from undertow.pretrain.checkpoint_manifest import write_manifest

log = get_logger("undertow.pretrain.deepspeed_convert")


def convert_from_deepspeed(ds_dir: str, out_dir: str, cfg, *, tag: str | None = None, overwrite: bool = False) -> str:
    """A DeepSpeed checkpoint directory written by `engine.save_checkpoint` (ZeRO-1/2/3 shards;
    `tag` defaults to the one in its `latest` file) -> the undertow checkpoint OUT_DIR of its
    float32 weights (DeepSpeed's zero_to_fp32 gathers them), for the model of `cfg` (an
    ExperimentConfig; model.vocab_size 0 takes the embedding's rows). No optimizer state and step 0
    in meta.json: start a run from it with checkpoint.init_from OUT_DIR. Returns OUT_DIR."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite to replace it")
    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=tag)
    if cfg.model.vocab_size == 0 and "embed.weight" in state:
        cfg.model = dataclasses.replace(cfg.model, vocab_size=state["embed.weight"].shape[0])
    try:
        model = registry.build_model_from_state(cfg.model, state)
    except ValueError as e:
        raise ValueError(f"{ds_dir}: {e}") from None
    with replacing_directory(out_dir, ".ds-convert-") as tmp:
        _dcp_save(dcp, {"model": get_state_dict(model, [])[0]}, tmp)
        write_meta(tmp, {"step": 0, "config": cfg.to_dict(), "tokenizer": None,
                         "source": {"deepspeed_dir": os.path.abspath(ds_dir)}})
        write_manifest(tmp, {})  # sizes and sha256, checked when the checkpoint is loaded
    log.info("converted DeepSpeed checkpoint %s into %s", ds_dir, out_dir)
    return out_dir


def _dcp_save(dcp, state: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns when it runs without a process group
        dcp.save(state, checkpoint_id=path)
