"""Hugging Face directory -> undertow checkpoint that a run can start from.

    import_hf(HF_DIR, OUT_DIR)

HF_DIR holds config.json and model.safetensors (or sharded model-*.safetensors with
model.safetensors.index.json). The family is found by config.json's `model_type` among the
registered adapters. OUT_DIR becomes a checkpoint directory in the trainer's format: the model
tensors through DCP (no optimizer state), meta.json with "step": 0, "config" (an
ExperimentConfig dict: the imported model, default sections) and "tokenizer" (the manifest-style
entry of HF_DIR's tokenizer.model, copied beside it), so `--checkpoint.init_from OUT_DIR` trains
from it. Written into a temporary sibling and renamed, like every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

from undertow.hf import HFConversionError, adapter_for_model_type
from undertow.hf.tokenizer import TOKENIZER_MODEL
from undertow.log import get_logger

log = get_logger("undertow.hf.import")
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    with open(path) as f:
        return json.load(f)


def read_hf_tensors(hf_dir: str) -> dict:
    """{name: tensor} from model.safetensors or the shards of model.safetensors.index.json."""
    from safetensors.torch import load_file

    single, index = os.path.join(hf_dir, SAFETENSORS), os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(hf_dir, shard)))
        return tensors
    raise FileNotFoundError(f"{hf_dir} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX} "
                            "(only safetensors weights are read: pickled .bin files are never unpickled)")


def _tokenizer_entry(hf_dir: str, out_dir: str) -> dict | None:
    """Copy HF_DIR's SentencePiece model beside the checkpoint; its manifest-style entry (None if absent)."""
    from undertow.data_prep.tokenizer import Tokenizer

    source = os.path.join(hf_dir, TOKENIZER_MODEL)
    if not os.path.isfile(source):
        log.warning("%s has no %s: the checkpoint records no tokenizer", hf_dir, TOKENIZER_MODEL)
        return None
    shutil.copyfile(source, os.path.join(out_dir, TOKENIZER_MODEL))
    return Tokenizer.load(source).describe(TOKENIZER_MODEL)


def _save_model(model, out_dir: str) -> None:
    """The model tensors in the layout `checkpoint.load_checkpoint(path, model, None)` reads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, _ = get_state_dict(model, [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.save({"model": model_sd}, checkpoint_id=out_dir)


def import_hf(hf_dir: str, out_dir: str, *, name: str | None = None, overwrite: bool = False) -> str:
    """Write the undertow checkpoint OUT_DIR from HF_DIR; returns OUT_DIR."""
    from undertow.models import registry
    from undertow.pretrain.checkpoint import replacing_directory, write_meta
    from undertow.pretrain.checkpoint_manifest import write_manifest
    from undertow.pretrain.config import build_config

    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    config = read_hf_config(hf_dir)
    family, adapter = adapter_for_model_type(config.get("model_type"))
    model_cfg, state = adapter.from_hf(config, read_hf_tensors(hf_dir))
    try:
        model = registry.build_model_from_state(model_cfg, state)
    except ValueError as e:
        raise HFConversionError(f"{hf_dir} (imported config): {e}") from None

    run_name = name or os.path.basename(os.path.normpath(hf_dir)) or "imported"
    experiment = build_config({"name": run_name, "model": {"family": family, **dataclasses.asdict(model_cfg)}})
    with replacing_directory(out_dir, ".hf-import-") as tmp:
        _save_model(model, tmp)
        write_meta(tmp, {"step": 0, "config": experiment.to_dict(), "tokenizer": _tokenizer_entry(hf_dir, tmp),
                         "source": {"hf_dir": os.path.abspath(hf_dir), "model_type": config["model_type"]}})
        write_manifest(tmp, {})  # sizes and sha256, checked when the checkpoint is loaded
    log.info("imported %s (%s) into checkpoint %s", hf_dir, config["model_type"], out_dir)
    return out_dir
