"""Command-line flags of image-text pretraining (main_slip.py: SLIP, CLIP, SimCLR; MedSLIP's recipe), torch-free
so that `--help` prints at once. Flag names are SLIP's `main.py` spellings, so its README commands run
verbatim (`torchrun --nproc_per_node=8 main_slip.py --dataset cc3m --root R --metadata M --model SLIP_VITB16`).
"""
from __future__ import annotations

import argparse

from util.cli import AMP_CHOICES, HelpFormatter, RangeRule, add_bool_flag, add_performance_args

DESCRIPTION = """Image-text contrastive pretraining: CLIP (image-text InfoNCE over the global batch), SimCLR
(NT-Xent between two augmented views) or SLIP (CLIP + --ssl-scale x SimCLR), with SLIP's flags, schedule
and checkpoint layout ({state_dict with module.-prefixed keys, epoch, optimizer, scaler, args}).

Examples:
  # MedSLIP's recipe on ROCO (lines 'image_name caption', images in ROOT/images/<name>.jpg):
  torchrun --nproc_per_node=4 main_slip.py --recipe medslip --root ROCO/train --metadata ROCO/train/captions.txt \\
      --model SLIP_VITB16 --batch-size 16 --epochs 100 --output-dir runs/medslip
  # SLIP's README: CLIP ViT-B/16 on CC3M
  torchrun --nproc_per_node=8 main_slip.py --dataset cc3m --root CC3M --metadata cc3m.npy \\
      --model CLIP_VITB16 --lr 5e-4 --wd 0.5 --output-dir runs/clip
  # MedSLIP's own model (SLIP objective on MedCLIP's Swin-T + BioClinicalBERT towers), weights from local files:
  torchrun --nproc_per_node=4 main_slip.py --recipe medslip --root ROCO/train --metadata ROCO/train/captions.txt \\
      --model MedSLIP_SWIN --text_model Bio_ClinicalBERT/ --medclip_weights medclip-vit/pytorch_model.bin \\
      --batch-size 16 --output-dir runs/medslip_swin
  # zero-shot evaluation of the result:
  python main_zeroshot.py --resume runs/clip/checkpoint-last.pth --data_path FOLDER --labels labels.json \\
      --templates templates.json --output-dir runs/clip/zeroshot
"""

# Defaults of the flags a user did not type; `slip` is the parser's own (SLIP's main.py).
RECIPES: dict[str, dict[str, object]] = {
    "slip": {},
    "medslip": {"dataset": "roco", "lr": 1e-4, "wd": 1e-6},
}

DATASETS = ("yfcc15m", "cc3m", "cc12m", "coco", "redcaps", "roco", "csv")


def get_args_parser(prog: str = "main_slip.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog, description=DESCRIPTION, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="yfcc15m", choices=DATASETS,
                   help="caption format of --metadata (roco: 'image_name caption' lines; csv: CSV/JSONL of image "
                        "path and caption; yfcc15m's pickle is refused with a conversion hint)")
    g.add_argument("--root", default="", help="image root the metadata's paths are relative to")
    g.add_argument("--metadata", default="", help="the caption file (see --dataset)")
    g.add_argument("--metadataval", default="",
                   help="validation captions (same format); their images under --root with /train/ replaced by "
                        "/validation/ (MedSLIP's ROCO layout) unless --root-val is given")
    g.add_argument("--root-val", dest="root_val", default="", help="image root of --metadataval")
    g.add_argument("--input-size", dest="input_size", default=224, type=int, help="crop side in pixels")
    g.add_argument("--context-length", dest="context_length", default=77, type=int,
                   help="text tokens per caption (MedSLIP_* models: 410 unless given, MedSLIP's max length)")
    g.add_argument("--compat", default="", choices=("", "slip_truncate"),
                   help="slip_truncate: cut over-long captions as SLIP does (dropping the end-of-text token the "
                        "text tower pools at); default: keep end-of-text in the last position")
    g.add_argument("--bad_image", "--bad-image", dest="bad_image", default="skip", choices=("error", "skip"),
                   help="unreadable image or empty caption: skip the pair (counted and listed in the log) or stop "
                        "with its file")

    g = p.add_argument_group("model")
    g.add_argument("--recipe", default="slip", choices=sorted(RECIPES),
                   help="defaults for the flags you do not type: SLIP's, or MedSLIP's (--dataset roco --lr 1e-4 "
                        "--wd 1e-6)")
    g.add_argument("--model", default="SLIP_VITB16",
                   help="SLIP_VIT{S,B,L}16, CLIP_VIT{S,B,L}16 or SIMCLR_VIT{S,B,L}16; MedSLIP_SWIN or MedSLIP_RESNET50 "
                        "(SLIP's objective on MedCLIP's towers; needs transformers); or a registered test size")
    g.add_argument("--ssl-mlp-dim", dest="ssl_mlp_dim", default=4096, type=int, help="hidden size of the SimCLR MLP")
    g.add_argument("--ssl-emb-dim", dest="ssl_emb_dim", default=256, type=int, help="output size of the SimCLR MLP")
    g.add_argument("--ssl-scale", dest="ssl_scale", default=1.0, type=float, help="weight of the SimCLR loss in SLIP")
    g.add_argument("--ssl-temp", dest="ssl_temp", default=0.1, type=float, help="SimCLR softmax temperature")
    g.add_argument("--loss", default="clip", choices=("clip", "siglip"),
                   help="image-text loss: CLIP's softmax InfoNCE or SigLIP's pairwise sigmoid")

    g = p.add_argument_group("MedSLIP towers (--model MedSLIP_*)")
    g.add_argument("--text_model", "--text-model", dest="text_model", default="",
                   help="Hugging Face text encoder: a local folder (config.json, vocab.txt, weights), a config.json "
                        "(random weights), or a Hub name already in the local cache (default "
                        "emilyalsentzer/Bio_ClinicalBERT); nothing is downloaded")
    g.add_argument("--medclip_weights", "--medclip-weights", dest="medclip_weights", default="",
                   help="initial weights: MedCLIP's pytorch_model.bin (vision_model.*, text_model.*) or a MedSLIP "
                        "checkpoint.pt (its unused SLIP towers are ignored)")
    g.add_argument("--text_pooling", "--text-pooling", dest="text_pooling", default="medclip", choices=("medclip", "masked"),
                   help="text embedding: MedCLIP's mean over all positions, padding included, or over the real tokens")
    g.add_argument("--norm", default="imagenet", choices=("imagenet", "medclip"),
                   help="image normalisation: ImageNet's statistics (SLIP's and MedSLIP's) or MedCLIP's grey-level "
                        "mean 0.5863 / std 0.2795")

    g = p.add_argument_group("training")
    g.add_argument("--output-dir", "--output_dir", dest="output_dir", default="./", help="run folder")
    g.add_argument("--resume", default="", help="checkpoint to continue from, or 'auto'")
    add_bool_flag(g, "--auto_resume", "--auto-resume", default=True, dest="auto_resume",
                  help="continue from the newest checkpoint in --output-dir when its config matches")
    g.add_argument("--epochs", default=25, type=int, help="training epochs")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", default=1, type=int, help="epochs of linear lr warm-up")
    g.add_argument("--start-epoch", dest="start_epoch", default=0, type=int, help="first epoch (resume sets it)")
    g.add_argument("--batch-size", dest="batch_size", default=64, type=int, help="pairs per process and step")
    g.add_argument("--lr", default=3e-3, type=float, help="peak learning rate (not scaled by the batch size)")
    g.add_argument("--lr-start", dest="lr_start", default=1e-6, type=float, help="learning rate the warm-up starts at")
    g.add_argument("--lr-end", dest="lr_end", default=1e-5, type=float, help="learning rate the cosine ends at")
    g.add_argument("--update-freq", dest="update_freq", default=1, type=int,
                   help="optimizer update every N steps (gradient accumulation)")
    g.add_argument("--wd", default=0.1, type=float, help="AdamW weight decay (not on biases, norms, logit scale)")
    g.add_argument("--betas", default=(0.9, 0.98), nargs=2, type=float, help="AdamW betas")
    g.add_argument("--eps", default=1e-8, type=float, help="AdamW epsilon")
    g.add_argument("--eval-freq", dest="eval_freq", default=1, type=int,
                   help="zero-shot evaluation (with --zeroshot-data) every N epochs")
    add_bool_flag(g, "--disable-amp", default=False, dest="disable_amp", help="full fp32 (same as --amp none)")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 on capable GPUs, else fp32; fp16 uses loss scaling (SLIP's)")
    g.add_argument("--print-freq", dest="print_freq", default=10, type=int, help="progress line every N steps")
    g.add_argument("-j", "--workers", dest="num_workers", default=None, type=int,
                   help="data-loader workers per process (default: min(8, cores per process))")
    g.add_argument("--evaluate", action="store_true",
                   help="zero-shot evaluation of --resume on --zeroshot-data only, no training")
    g.add_argument("--save-every-steps", dest="save_every_steps", default=0, type=int,
                   help="also checkpoint every N optimizer updates (mid-epoch resume)")
    g.add_argument("--keep_last", default=0, type=int, help="periodic checkpoints to keep (0: all)")
    g.add_argument("--save-freq", dest="save_freq", default=1, type=int, help="keep checkpoint-{epoch}.pth every N epochs")
    g.add_argument("--max_nonfinite", default=5, type=int, help="stop after this many non-finite steps in a row")
    add_bool_flag(g, "--wandb", default=False, help="accepted for SLIP command lines; ignored (no network): metrics "
                  "go to log.txt and TensorBoard")

    g = p.add_argument_group("zero-shot monitor (optional)")
    g.add_argument("--zeroshot-data", dest="zeroshot_data", default="",
                   help="ImageFolder (class folders, or test/ or val/ of them) to classify zero-shot every --eval-freq "
                        "epochs")
    g.add_argument("--zeroshot-labels", dest="zeroshot_labels", default="", help="labels.json for it")
    g.add_argument("--zeroshot-templates", dest="zeroshot_templates", default="", help="templates.json for it")
    g.add_argument("--zeroshot-name", dest="zeroshot_name", default="",
                   help="entry of the two files to use (not needed when they hold one entry)")

    g = p.add_argument_group("distributed / device (torchrun's environment wins)")
    g.add_argument("--device", default="cuda", help="cuda or cpu (falls back to cpu when CUDA is absent)")
    g.add_argument("--seed", default=0, type=int, help="base random seed")
    g.add_argument("--world-size", "--world_size", dest="world_size", default=1, type=int,
                   help="number of processes (SLURM launches; torchrun sets it itself)")
    g.add_argument("--rank", default=0, type=int, help="node rank for SLURM launches (torchrun sets RANK)")
    g.add_argument("--dist-url", "--dist_url", dest="dist_url", default="env://", help="process-group init URL")
    g.add_argument("--dist-backend", dest="dist_backend", default="nccl",
                   help="accepted; the backend is nccl on GPUs and gloo on CPU")
    g.add_argument("--gpu", dest="gpu_index", default=None, type=int, help="GPU index of a single-process run")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                   help="set by torch.distributed.launch; LOCAL_RANK from the environment wins")
    add_bool_flag(g, "--pin_mem", default=True, help="pin host memory for faster host-to-GPU copies")
    g.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="validate flags and data, print the plan, exit")
    g.add_argument("--inject_nonfinite", default="", help=argparse.SUPPRESS)  # test hook: poison these update steps
    add_performance_args(p)
    return p


# Value ranges checked before any work (util.cli.check_ranges).
RULES: list[RangeRule] = [
    ("epochs", ">=1"), ("warmup_epochs", ">=0"), ("start_epoch", ">=0"), ("batch_size", ">=1"), ("lr", ">0"),
    ("lr_start", ">=0"), ("lr_end", ">=0"), ("update_freq", ">=1"), ("wd", ">=0"),
    ("betas", ">=0 <1", "e.g. 0.9 0.98"), ("eps", ">0"), ("eval_freq", ">=1"), ("print_freq", ">=1"),
    ("ssl_mlp_dim", ">=1"), ("ssl_emb_dim", ">=1"), ("ssl_scale", ">=0"), ("ssl_temp", ">0"),
    ("input_size", ">=16"), ("context_length", ">=2"), ("num_workers", ">=0"), ("world_size", ">=1"),
    ("save_every_steps", ">=0"), ("save_freq", ">=0"), ("keep_last", ">=0"), ("max_nonfinite", ">=1"),
]

# Config fields whose change makes a continued run a different experiment.
SLIP_RESUME_FIELDS = ("dataset", "metadata", "root", "lr", "lr_start", "lr_end", "wd", "update_freq", "batch_size",
                      "ssl_scale", "ssl_temp", "ssl_mlp_dim", "ssl_emb_dim", "loss", "context_length", "compat",
                      "text_model", "text_pooling", "norm")


# ------------------------------------------------------------------------------------------- zero-shot
def get_zeroshot_parser(prog: str = "main_zeroshot.py", description: str | None = None,
                        slip_defaults: bool = False) -> argparse.ArgumentParser:
    """Flags of main_zeroshot.py and eval_zeroshot.py. `slip_defaults`: eval_zeroshot.py's, reading dataset_catalog.json, labels.json and templates.json from
    the current folder, as SLIP's script does."""
    p = argparse.ArgumentParser(prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--resume", required=True, help="image-text checkpoint (main_slip.py's or SLIP's checkpoint.pt)")
    p.add_argument("--data_path", "--data-path", dest="data_path", default="",
                   help="ImageFolder to classify: class folders, or a folder with test/ (else val/) of them")
    p.add_argument("--catalog", default="dataset_catalog.json" if slip_defaults else "",
                   help="SLIP's dataset_catalog.json (name -> {path, type: imagefolder|filelist, train, test}); every "
                        "entry is evaluated unless --dataset names one")
    p.add_argument("--labels", default="labels.json" if slip_defaults else "",
                   help="labels.json: name -> class names in the dataset's class order (an entry may be a synonym list)")
    p.add_argument("--templates", default="templates.json" if slip_defaults else "",
                   help="templates.json: name -> prompt templates with {} for the class name")
    p.add_argument("--dataset", default="", help="entry of the json files (not needed when they hold one)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default="./" if slip_defaults else "",
                   help="metrics json/csv, confusion and ROC PNGs go here")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", default=256, type=int, help="images per batch")
    p.add_argument("-j", "--workers", dest="num_workers", default=None, type=int, help="data-loader workers")
    p.add_argument("--input-size", dest="input_size", default=None, type=int,
                   help="image side (default: the checkpoint's, else 224)")
    p.add_argument("--context-length", dest="context_length", default=77, type=int, help="text tokens per prompt")
    p.add_argument("--text_model", default=None,
                   help="MedSLIP checkpoints: the local Hugging Face text model folder, when not where training had it")
    p.add_argument("--n_boot", default=1000, type=int, help="bootstrap resamples for the CIs (0: none)")
    p.add_argument("--bad_image", default="skip", choices=("error", "skip"),
                   help="unreadable image: skip it (listed in the metrics) or stop with its path")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="mixed precision (auto: bf16 on capable GPUs)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (falls back to cpu)")
    p.add_argument("--seed", default=0, type=int, help="bootstrap seed")
    p.add_argument("--pin_mem", default=True, help=argparse.SUPPRESS)
    return p


ZEROSHOT_RULES: list[RangeRule] = [("batch_size", ">=1"), ("num_workers", ">=0"), ("input_size", ">=16"),
                                   ("context_length", ">=2"), ("n_boot", ">=0")]
