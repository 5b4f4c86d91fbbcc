"""MedSLIP's CBIS-DDSM linear probe (linear_probing_on_CBIS/linear_probe_CBIS_MedSLIP.py) with its flags:
main_finetune.py with a frozen image encoder, a linear head and --recipe medslip_cbis.

  python linear_probing_on_CBIS/linear_probe_CBIS_MedSLIP.py --seed 77 --batchsize 16 --pretrain_epoch 25 \\
      --path logs/ --modeltype vit --ipath image_encoder.pth --epochs 15 --data_path CBIS/train_calcification.csv

--modeltype vit|swin|resnet: MedCLIP's vision model (512-d embeddings) with the weights of --ipath
(image_encoder.pth / best_image_encoder.pth, MedCLIP's pytorch_model.bin or a MedSLIP checkpoint.pt);
slip: the vision tower of a SLIP/CLIP checkpoint (module.visual. of its state_dict; the model it records).
--data_path: train_<abnormality>.csv (its test_<abnormality>.csv beside it) or their folder; columns
image_path, pathology (MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK). Results go to --path/<run name>/.
--recipe medslip_cbis_compat reproduces the reference's settings (validation on the test CSV, ...); every
other main_finetune.py flag is accepted too.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from util.cli import UserError, exit_if_help, run_main  # noqa: E402

MODELTYPES = {"vit": "medclip_vit", "swin": "medclip_swin", "resnet": "medclip_resnet", "slip": "auto"}


def get_args_parser():
    import finetune_args
    p = finetune_args.get_args_parser("linear_probing_on_CBIS/linear_probe_CBIS_MedSLIP.py", __doc__)
    g = p.add_argument_group("MedSLIP CBIS probe flags")
    g.add_argument("--batchsize", default=None, type=int, help="= --batch_size (the recipe's 16 by default)")
    g.add_argument("--pretrain_epoch", default=None, type=int,
                   help="pretraining epoch of --ipath; part of the run name (results under --path/<run name>)")
    g.add_argument("--path", default=None, help="log folder (= --output_dir)")
    g.add_argument("--modeltype", default="vit", choices=tuple(MODELTYPES),
                   help="image encoder: MedCLIP's vit (Swin), swin or resnet; slip = a SLIP/CLIP checkpoint's tower")
    g.add_argument("--ipath", default=None, help="image encoder weights (= --finetune)")
    p.set_defaults(recipe="medslip_cbis", input_size=384)  # MedSLIP resized mammograms to 384 x 384
    return p


def main(args):
    given = set(getattr(args, "explicit_flags", None) or ())
    if args.batchsize is not None:
        args.batch_size = args.batchsize
        given.add("batch_size")
    if args.path:
        args.output_dir = args.path
        given.add("output_dir")
    if args.ipath:
        args.finetune = args.ipath
    if "model" not in given:
        args.model = MODELTYPES[args.modeltype]
    if args.modeltype == "slip":
        args.checkpoint_key = args.checkpoint_key or "state_dict"
        args.model_prefix = args.model_prefix or "module.visual."
    if not args.finetune and args.modeltype == "slip":
        raise UserError("--modeltype slip needs --ipath <SLIP/CLIP checkpoint.pt>")
    if not args.task:
        args.task = f"cbis_{args.modeltype}" + (f"_ep{args.pretrain_epoch}" if args.pretrain_epoch is not None else "") \
            + f"_seed{args.seed}"
    args.explicit_flags = sorted(given)  # the recipe leaves the values mapped from MedSLIP's flags alone
    import main_finetune
    return main_finetune.main(args)


exit_if_help(get_args_parser)

if __name__ == "__main__":
    run_main(main, get_args_parser())
