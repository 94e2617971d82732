"""undertow checkpoint -> Hugging Face directory (config.json, model.safetensors, tokenizer).

    export_checkpoint(CHECKPOINT, OUT_DIR)

CHECKPOINT is a `step_XXXXXXXX/` directory (or a run's checkpoint root: its newest one). The
model is rebuilt from meta.json's config through the registry, its weights loaded with DCP, and
the family's adapter (models/<family>/hf.py) maps names, layouts and config. Everything that can
refuse (architecture, tokenizer) is checked before OUT_DIR is written; OUT_DIR is built in a
temporary sibling and renamed into place, so it never holds half an export.
"""

from __future__ import annotations

import json
import os

import torch

from undertow.data_prep.format import sha256_file
from undertow.hf import adapter_for_family
from undertow.hf.remote import remote_sources, write_remote_code
from undertow.hf.tokenizer import write_hf_tokenizer
from undertow.log import get_logger

log = get_logger("undertow.hf.export")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory (has meta.json), or the newest complete one under a checkpoint root."""
    from undertow.pretrain import checkpoint as ckpt

    if os.path.isfile(os.path.join(path, ckpt.META_NAME)):
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no {ckpt.META_NAME}) nor a directory of step_* checkpoints")
    return latest


def _tokenizer_candidates(checkpoint: str, entry: dict, data_sources: list[str], embedded_vocab: int) -> list[str]:
    """Where the tokenizer entry's `file` may be: absolute, beside the checkpoint, or in a data source dir."""
    file = entry.get("file") or ""
    if os.path.isabs(file):
        return [file]
    found = [os.path.join(checkpoint, file)]
    for source in data_sources:
        if source == "embedded":
            from undertow.data_prep.corpus import ensure_embedded_dataset

            source = ensure_embedded_dataset(vocab_size=embedded_vocab)
        if os.path.isdir(source):
            found.append(os.path.join(source, file))
    return found


def find_tokenizer(checkpoint: str, meta: dict, explicit: str | None = None) -> str:
    """The SentencePiece file the checkpoint was trained with, its sha256 checked against meta.json."""
    entry = meta.get("tokenizer") or {}
    if explicit is not None:
        candidates = [explicit]
    elif not entry:
        raise FileNotFoundError(f"{checkpoint}/meta.json records no tokenizer; pass --tokenizer PATH")
    else:
        data = meta["config"].get("data", {})
        candidates = _tokenizer_candidates(checkpoint, entry, data.get("sources", []),
                                           data.get("embedded_vocab_size", 2048))
    for path in candidates:
        if os.path.isfile(path):
            if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
                raise ValueError(f"tokenizer {path} is not the one the checkpoint was trained with "
                                 f"(sha256 differs from meta.json's {entry['sha256'][:12]}...)")
            return path
    raise FileNotFoundError(f"tokenizer file {entry.get('file')!r} not found (looked at {candidates}); "
                            "pass --tokenizer PATH")


def read_checkpoint(checkpoint: str) -> tuple[dict, str, object]:
    """(meta dict, family, validated model config) of a checkpoint directory.

    Only the model config is rebuilt, not the whole experiment: its data paths or resume
    directory need not exist where the export runs."""
    from undertow.pretrain import checkpoint as ckpt
    from undertow.pretrain.config import build_model_config

    meta = ckpt.read_meta(checkpoint)
    family = meta["config"]["model"]["family"]
    model_cfg = build_model_config(meta["config"]["model"])
    model_cfg.validate()
    return meta, family, model_cfg


def load_model(checkpoint: str, model_cfg) -> torch.nn.Module:
    """The model of `model_cfg` with the checkpoint's weights (DCP), on CPU, in eval mode."""
    from undertow.models import registry
    from undertow.pretrain import checkpoint as ckpt

    model = registry.build_model(model_cfg)
    ckpt.load_checkpoint(checkpoint, model, None)
    return model.eval()


def _special_ids(entry: dict) -> dict:
    """bos/eos/pad ids of the tokenizer entry; None where the tokenizer has none (id -1)."""
    ids = {role: entry.get(f"{role}_id") for role in ("bos", "eos", "pad")}
    return {role: i if isinstance(i, int) and i >= 0 else None for role, i in ids.items()}


def export_checkpoint(checkpoint: str, out_dir: str, *, dtype: str = "float32", tokenizer: str | None = None,
                      overwrite: bool = False) -> dict:
    """Write OUT_DIR for stock transformers; returns the config.json dict written."""
    from safetensors.torch import save_file

    from undertow.pretrain import checkpoint as ckpt
    from undertow.pretrain.safe_checkpoint import check_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    checkpoint = resolve_checkpoint(checkpoint)
    check_checkpoint(checkpoint)  # a crafted .metadata is refused first (load_model checks again)
    meta, family, model_cfg = read_checkpoint(checkpoint)
    adapter = adapter_for_family(family)
    architecture = adapter.hf_architecture(model_cfg)  # refuse before loading anything
    # a family (or, the adapter's `remote_code(cfg)`, a config) without a stock transformers class
    remote = getattr(adapter, "REMOTE_CODE", None)
    if hasattr(adapter, "remote_code"):
        remote = adapter.remote_code(model_cfg)
    if remote is not None:
        remote_sources(remote)  # refuse a missing or non-self-contained modeling file early
    spm_path = find_tokenizer(checkpoint, meta, tokenizer)
    model = load_model(checkpoint, model_cfg)
    config, tensors = adapter.to_hf(model_cfg, model.state_dict(), _special_ids(meta.get("tokenizer") or {}))
    config["dtype"] = config["torch_dtype"] = dtype  # the key of transformers 5, and of earlier versions
    tensors = {name: t.detach().to(DTYPES[dtype]).contiguous() for name, t in tensors.items()}

    with ckpt.replacing_directory(out_dir, ".hf-export-") as tmp:
        write_hf_tokenizer(spm_path, tmp)
        if remote is not None:
            write_remote_code(remote, tmp, config)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    log.info("exported %s (%s, step %s) to %s as %s", checkpoint, family, meta.get("step"), out_dir, architecture)
    return config

