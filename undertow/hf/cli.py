"""`undertow convert to-hf CHECKPOINT OUT_DIR`, `undertow convert from-hf HF_DIR OUT_DIR` and
`undertow convert from-deepspeed DS_DIR OUT_DIR RECIPE [--section.field VALUE ...]`."""

from __future__ import annotations

import argparse
import sys

_TO_HF = """\
Write a Hugging Face directory that transformers loads (stock classes without trust_remote_code):
config.json, model.safetensors, tokenizer.json + tokenizer_config.json (rebuilt from the run's
SentencePiece model and checked to encode exactly like it) and tokenizer.model.

Mamba family layer patterns and their transformers classes:
  all m                      MambaForCausalLM (FalconMambaForCausalLM with model.falcon_norm)
  all M                      Mamba2ForCausalLM
  pairs of (M or *) and -    BambaForCausalLM, e.g. M-M-*-M- (with model.mlp swiglu and
                             model.position_embedding rope: Bamba's MLP is gated, its attention
                             always rotary)
xLSTM family:
  all m (the xLSTM-7B block)  xLSTMForCausalLM (its own code; qk and v widths multiples of 64)
Recurrent-depth family (no stock class): remote code. The directory gets
configuration_undertow_depth.py and modeling_undertow_depth.py (self-contained: torch and
transformers only) and config.json's auto_map; load it with
  AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
Huginn runs config.num_steps core steps (the eval depth); model(ids, num_steps=r) picks another.
ParaRNN family (no stock class): remote code the same way (configuration_/modeling_undertow_pararnn.py);
the ParaGRU / ParaLSTM cells run as their sequential loop (inference), every layer pattern.
Titans family (no stock class): remote code the same way (configuration_/modeling_undertow_titans.py);
MAC, MAG and MAL, the memory by the chunk-start rule of training.
The remote-code exports of ParaRNN, Titans and depth models take dense MLPs only (MoE: refused).
Transformer with MoE MLPs: the linear router -> MixtralForCausalLM; the RMoE router (a GRU shared
by all layers) -> remote code the same way (configuration_/modeling_undertow_rmoe.py).
Other patterns and settings are refused with the reason.

example:
  undertow convert to-hf runs/tiny-mamba2/checkpoints/step_00000300 hf/tiny-mamba2
  python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/tiny-mamba2')"
"""

_FROM_HF = """\
Import a Hugging Face directory (config.json with model_type mamba, falcon_mamba, mamba2,
bamba, xlstm, mixtral, undertow_depth, undertow_pararnn, undertow_titans or undertow_rmoe;
safetensors weights) as an undertow checkpoint: model tensors (DCP), meta.json with
step 0, the config and the tokenizer entry (tokenizer.model is copied beside it). No optimizer
state: start training from it with --checkpoint.init_from OUT_DIR.

example:
  undertow convert from-hf hf/tiny-mamba2 ckpt/tiny-mamba2
  undertow pretrain tiny --checkpoint.init_from ckpt/tiny-mamba2
"""


_FROM_DEEPSPEED = """\
Convert a checkpoint DeepSpeed wrote in its own format (engine.save_checkpoint: ZeRO-1/2/3
shards, a `latest` file naming the tag) into an undertow checkpoint: the float32 weights
(gathered by DeepSpeed's zero_to_fp32) as DCP model tensors and meta.json with step 0, for the
model of RECIPE with the overrides given (the model must match the weights; model.vocab_size 0
takes the embedding's rows). No optimizer state: start a run from it with
--checkpoint.init_from OUT_DIR. Checkpoints that `undertow pretrain` writes under
parallel.engine = deepspeed are in our format already and need no conversion. Needs DeepSpeed
(pip install 'undertow[deepspeed]').

example:
  undertow convert from-deepspeed ds_run/checkpoints ckpt/from-ds tiny-hybrid --model.d_model 64
  undertow pretrain tiny-hybrid --model.d_model 64 --checkpoint.init_from ckpt/from-ds
"""


def cmd_from_deepspeed(args: argparse.Namespace, overrides: list[str]) -> int:
    from undertow.pretrain.deepspeed_convert import convert_from_deepspeed
    from undertow.pretrain.config import load_config

    cfg = load_config(args.recipe, overrides)
    path = convert_from_deepspeed(args.ds_dir, args.out_dir, cfg, tag=args.tag, overwrite=args.overwrite)
    print(f"wrote checkpoint {path}; train from it with --checkpoint.init_from {path}")
    return 0


def cmd_to_hf(args: argparse.Namespace) -> int:
    from undertow.hf.export import export_checkpoint

    config = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer,
                               overwrite=args.overwrite)
    print(f"wrote {args.out_dir} ({config['architectures'][0]}, {args.dtype})")
    return 0


def cmd_from_hf(args: argparse.Namespace) -> int:
    from undertow.hf.import_ import import_hf

    path = import_hf(args.hf_dir, args.out_dir, name=args.name, overwrite=args.overwrite)
    print(f"wrote checkpoint {path}; train from it with --checkpoint.init_from {path}")
    return 0


def _run(func):
    """Conversion errors (refusals, missing files) print one line and exit 2."""
    def wrapped(args: argparse.Namespace, *rest) -> int:
        try:
            return func(args, *rest)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapped


def add_convert_parser(subparsers) -> None:
    """Add `convert {to-hf,from-hf}` to the `undertow` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    convert = subparsers.add_parser("convert", help="convert checkpoints to and from Hugging Face (and from DeepSpeed)",
                                    description="Convert checkpoints to and from Hugging Face transformers, and "
                                                "from DeepSpeed's own checkpoint format.")
    sub = convert.add_subparsers(dest="convert_command", required=True)

    to_hf = sub.add_parser("to-hf", help="undertow checkpoint -> Hugging Face directory", description=_TO_HF,
                           formatter_class=fmt)
    to_hf.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint directory (or a checkpoint root: its newest)")
    to_hf.add_argument("out_dir", help="the Hugging Face directory to write")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="dtype of the saved weights (default float32)")
    to_hf.add_argument("--tokenizer", metavar="PATH",
                       help="SentencePiece model to export (default: the one meta.json records, sha256-checked)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    to_hf.set_defaults(func=_run(cmd_to_hf))

    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> undertow checkpoint", description=_FROM_HF,
                             formatter_class=fmt)
    from_hf.add_argument("hf_dir", help="directory with config.json and model.safetensors")
    from_hf.add_argument("out_dir", help="the checkpoint directory to write")
    from_hf.add_argument("--name", help="run name stored in the checkpoint's config (default: HF_DIR's name)")
    from_hf.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    from_hf.set_defaults(func=_run(cmd_from_hf))

    from_ds = sub.add_parser("from-deepspeed", help="DeepSpeed checkpoint -> undertow checkpoint",
                             description=_FROM_DEEPSPEED, formatter_class=fmt)
    from_ds.add_argument("ds_dir", help="the directory DeepSpeed's engine.save_checkpoint wrote (with `latest`)")
    from_ds.add_argument("out_dir", help="the checkpoint directory to write")
    from_ds.add_argument("recipe", help="recipe name or .toml path of the model (overrides: --section.field VALUE)")
    from_ds.add_argument("--tag", help="the checkpoint tag to convert (default: the one in DS_DIR/latest)")
    from_ds.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    from_ds.set_defaults(func=_run(cmd_from_deepspeed), takes_overrides=True)
