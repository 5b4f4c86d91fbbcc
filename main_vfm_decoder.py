"""VisionFM's decoders on frozen encoders: single-label / binary / multi-label classification, biomarker
regression and progression forecasting (`--task`).

Inputs: images through a frozen encoder (`--pretrained_weights` + `--data_path`, features computed on the
fly), or features written by main_vfm_features.py (`--datasets A B` under `--data_path`; several feature
sets of the same images from different modality encoders are concatenated per image id). The head is
saved in VisionFM's layout (`state_dict` with DDP's `module.` prefix) as
`<output_dir>/<name>/checkpoint_<checkpoint_key>_linear.pth`; `--load_from CKPT --test` evaluates it on the
test split and checks the metrics saved with it. The checkpoint is the last epoch's: the test split is
never used to pick an epoch (test metrics every --val_freq epochs are for monitoring only).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, NamedTuple

import vfm_args
import vfm_decoder_args
from util.cli import UserError, args_to_dict, check_output_path, check_ranges, exit_if_help, run_main

logger = logging.getLogger("medfound")
TASK_CHOICES = vfm_decoder_args.TASK_CHOICES
DEFAULT_OUTPUTS = vfm_decoder_args.DEFAULT_OUTPUTS
RULES = vfm_decoder_args.RULES


def get_args_parser(prog: str = "main_vfm_decoder.py", task: str | None = None) -> argparse.ArgumentParser:
    return vfm_decoder_args.get_args_parser(prog, task)


exit_if_help(get_args_parser)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine_vfm  # noqa: E402
from models_vfm_heads import build_head  # noqa: E402
from util.atomic import write_atomic  # noqa: E402
from util.dist import cleanup, get_rank, get_world_size, is_main_process  # noqa: E402
from util.logger import RunLogger, print_summary  # noqa: E402
from util.loop import Optimization  # noqa: E402
from util.metrics import log_to_tensorboard, plot_roc, write_metrics  # noqa: E402
from util.runtime import prepare_model, setup, start_guard, training_started  # noqa: E402


class Split(NamedTuple):
    """One split: `x` is a feature matrix [N, F] or a list of image paths; y [N] or [N, K]; days [N]."""
    ids: list[str]
    x: Any
    y: np.ndarray
    days: np.ndarray


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform: Any = None) -> None:
        self.split, self.transform = split, transform
        self.y = torch.as_tensor(split.y)
        self.days = torch.as_tensor(split.days, dtype=torch.float32)
        self.x = split.x if transform is not None else torch.as_tensor(split.x, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, i: int) -> tuple:
        if self.transform is None:
            x = self.x[i]
        else:
            from util.data import load_image
            x = self.transform(load_image(self.x[i]))
        return x, self.y[i], self.days[i], i


# ------------------------------------------------------------------------------------------------ inputs
def resolve_args(args: argparse.Namespace) -> None:
    check_ranges(args, RULES)
    if args.num_labels is None:
        if args.task == "cls":
            raise UserError("--num_labels is required for --task cls (classes; 1 = binary with one logit)")
        args.num_labels = DEFAULT_OUTPUTS[args.task]
    if args.task == "forecasting" and args.num_labels != 1:
        logger.info("--num_labels %d: forecasting predicts one progression logit", args.num_labels)
    if not args.data_path:
        raise UserError("--data_path is required: the image data root, or the folder of the --datasets feature sets")
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path}: not a folder")
    if not args.datasets:
        vfm_args.check_encoder_args(args)
        if not args.pretrained_weights:
            raise UserError("give --pretrained_weights (features computed by a frozen encoder) or --datasets "
                            "(features extracted by main_vfm_features.py)")
    if args.test and not args.load_from:
        raise UserError("--test evaluates a trained decoder: add --load_from CKPT")
    if args.dataset_format == "ImageNet" and args.task != "cls":
        raise UserError(f"--dataset_format ImageNet holds class folders: only --task cls, not {args.task}")
    if args.name:
        args.output_dir = os.path.join(args.output_dir, args.name)


def _targets(task: str, records: list) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (cls) or multi-hot rows (multi_cls) of parsed label-file records."""
    if task == "cls":
        y = np.array([int(r.values[0]) for r in records], dtype=np.int64)
    else:
        y = np.array([r.values for r in records], dtype=np.float32)
    return y, np.zeros(len(records), dtype=np.float32)


def image_splits(args: argparse.Namespace) -> tuple[Split, Split, list[str] | None]:
    """Train/test image lists with targets from VisionFM label files or ImageNet folders."""
    from util.label_layouts import read_imagefolder, read_vfm_records
    if args.dataset_format == "ImageNet":
        tr, classes = read_imagefolder(os.path.join(args.data_path, "train"))
        te, _ = read_imagefolder(os.path.join(args.data_path, "test"), classes)
        mk = (lambda s: Split([p for p, _ in s], [p for p, _ in s], np.array([t for _, t in s], dtype=np.int64),
                              np.zeros(len(s), dtype=np.float32)))
        return mk(tr), mk(te), classes
    from util.label_measurements import read_vfm_forecasting, read_vfm_regression
    out, names = [], None
    for split in ("train", "test"):
        if args.task == "metric_reg":  # empty fields are NaN; names from --target_names, a header or a sidecar
            paths, y, names = read_vfm_regression(args.data_path, split, args.num_labels, args.target_names)
            days = np.zeros(len(paths), dtype=np.float32)
            y = y.astype(np.float32)
        elif args.task == "forecasting":  # `path, label, days` in {training,test}_labels.txt or training/test.txt
            recs = read_vfm_forecasting(args.data_path, split)
            paths = [r[0] for r in recs]
            y = np.array([r[1] for r in recs], dtype=np.int64)
            days = np.array([r[2] for r in recs], dtype=np.float32)
        else:
            recs = read_vfm_records(args.data_path, split, args.num_labels)
            y, days = _targets(args.task, recs)
            paths = [r.image for r in recs]
        out.append(Split(paths, paths, y, days))
    return out[0], out[1], names


def _read_set(root: str, split: str) -> Any:
    from util.feature_store import read_features
    return read_features(root, split)


def _labels_of(task: str, fs: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(fs.labels)
    extra = getattr(fs, "extra", None) or {}
    days = np.asarray(extra.get("days", np.zeros(len(fs.stems))), dtype=np.float32).reshape(-1)
    if task in ("cls", "forecasting"):
        return labels.reshape(len(labels), -1)[:, 0].astype(np.int64), days
    return labels.astype(np.float32).reshape(len(labels), -1), days


def fuse(sets: list[tuple[str, Any]], task: str, split: str) -> Split:
    """Concatenate the features of several sets per image id (order of the first set). Ids are the stems the
    extractor stored; an id repeated within a set (augmented repeats) is paired in order, cycling the
    shorter list. Ids missing from any set: one error listing a few."""
    from collections import defaultdict
    rows: list[dict[str, list[int]]] = []
    for _, fs in sets:
        d: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(fs.stems):
            d[str(s)].append(i)
        rows.append(d)
    ids0 = list(dict.fromkeys(str(s) for s in sets[0][1].stems))
    for (name, _), d in zip(sets, rows):
        others = set(ids0)
        missing, extra = sorted(others - set(d)), sorted(set(d) - others)
        if missing or extra:
            show = lambda v: ", ".join(v[:5]) + (f" (+{len(v) - 5} more)" if len(v) > 5 else "")  # noqa: E731
            raise UserError(f"--datasets: {split} image ids differ between {sets[0][0]} and {name}: "
                            + "; ".join(x for x in (f"{len(missing)} missing from {name} ({show(missing)})" if missing else "",
                                                    f"{len(extra)} only in {name} ({show(extra)})" if extra else "") if x)
                            + "; extract every modality from the same images")
    feats, order_ids, first_idx = [], [], []
    for sid in ids0:
        n = max(len(d[sid]) for d in rows)
        for r in range(n):
            order_ids.append(sid)
            first_idx.append(rows[0][sid][r % len(rows[0][sid])])
            feats.append([np.asarray(fs.features[d[sid][r % len(d[sid])]]).reshape(-1)
                          for (_, fs), d in zip(sets, rows)])
    x = np.stack([np.concatenate(f) for f in feats]).astype(np.float32)
    y, days = _labels_of(task, sets[0][1])
    return Split(order_ids, x, y[first_idx], days[first_idx])


def feature_splits(args: argparse.Namespace) -> tuple[Split, Split, list[str] | None]:
    out = []
    for split in ("train", "test"):
        sets = []
        for name in args.datasets:
            root = os.path.join(args.data_path, name)
            if not os.path.isdir(root):
                raise UserError(f"--datasets {name}: no folder {root}; extract the features there first")
            sets.append((name, _read_set(root, split)))
        out.append(fuse(sets, args.task, split))
    meta = getattr(sets[0][1], "meta", None) or {}
    names = meta.get("target_names") or meta.get("class_names")
    return out[0], out[1], list(names) if names else None


def class_names(args: argparse.Namespace, found: list[str] | None, k: int) -> list[str]:
    if args.task == "metric_reg":
        names = args.target_names or found
        if names and len(names) != k:
            raise UserError(f"--target_names: {len(names)} names for {k} targets")
        return list(names) if names else [f"target_{i}" for i in range(k)]
    if args.task == "multi_cls" and k == len(engine_vfm.VFM13_CLASSES):
        return list(engine_vfm.VFM13_CLASSES)
    if args.task == "forecasting":
        return ["stable", "progression"]
    return list(found) if found and len(found) == max(k, 2) else [str(i) for i in range(max(k, 2))]


# ----------------------------------------------------------------------------------------------- run
def main(args: argparse.Namespace) -> dict[str, Any]:
    resolve_args(args)
    check_output_path(args.output_dir)
    with start_guard(args.output_dir):
        return run(args)


def build_inputs(args: argparse.Namespace, device: torch.device) -> tuple[Split, Split, Any, Any, list[str] | None]:
    if args.datasets:
        train, test, found = feature_splits(args)
        return train, test, None, None, found
    from models_vfm import build_frozen_encoder
    from torchvision import transforms as T
    from util.modalities import modality_stats
    encoder = build_frozen_encoder(args)
    mean, std = modality_stats(args.modality)
    s = args.input_size
    resize = T.Resize((s, s), interpolation=T.InterpolationMode.BICUBIC)
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose([resize, T.RandomHorizontalFlip(), T.RandomVerticalFlip(), *tail])
    train, test, found = image_splits(args)
    return train, test, encoder, (train_tf, T.Compose([resize, *tail])), found


def loaders(args: argparse.Namespace, train: Split, test: Split, tfs: Any, device: torch.device) -> tuple:
    from torch.utils.data import DataLoader, DistributedSampler
    from util.runtime import default_workers
    workers = 0 if tfs is None else default_workers(device, args.num_workers)
    ds_train = ArrayDataset(train, tfs[0] if tfs else None)
    ds_test = ArrayDataset(test, tfs[1] if tfs else None)
    sampler = DistributedSampler(ds_train, get_world_size(), get_rank(), shuffle=True, seed=args.seed)
    bs = args.batch_size_per_gpu
    # BatchNorm cannot train on a batch of one: drop a trailing single sample.
    per_rank = len(sampler)
    drop = per_rank > 1 and per_rank % bs == 1
    train_loader = DataLoader(ds_train, batch_size=bs, sampler=sampler, num_workers=workers, drop_last=drop)
    # Every rank evaluates the whole test split, so metrics are computed once on all of it.
    test_loader = DataLoader(ds_test, batch_size=bs, shuffle=False, num_workers=workers)
    return train_loader, test_loader, sampler


def load_head_checkpoint(path: str) -> dict[str, Any]:
    from util.checkpoint import load_file
    ckpt = load_file(path, flag="--load_from")
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--load_from {path}: no decoder state dict in it (expected a 'state_dict' entry)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return {"state_dict": sd, **({k: v for k, v in ckpt.items() if k != "state_dict"} if "state_dict" in ckpt else {})}


def save_head_checkpoint(path: str, head: torch.nn.Module, optimizer: Any, epoch: int, args: argparse.Namespace,
                         extra: dict[str, Any]) -> None:
    """VisionFM's layout: state_dict keyed as DDP writes it (`module.` prefix), epoch, optimizer; plus what
    --test needs to reproduce the metrics (target statistics, head shape, the test metrics as JSON)."""
    import io
    sd = {f"module.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
    blob = {"epoch": epoch, "state_dict": sd, "optimizer": optimizer.state_dict() if optimizer else {},
            "args": args_to_dict(args), **extra}
    buf = io.BytesIO()
    torch.save(blob, buf)
    write_atomic(path, buf.getvalue())


def save_figures(task: str, metrics: dict[str, Any], y: np.ndarray, pred: np.ndarray, names: list[str],
                 out: str, n_boot: int, seed: int) -> list[str]:
    """ROC (util.metrics) and PR per label for classification/forecasting; predicted vs true per target for
    regression."""
    from util.metric_plots import _figure, _save_png
    files = []
    if task == "metric_reg":
        k = y.shape[1]
        cols = min(k, 6)
        rows = (k + cols - 1) // cols
        fig = _figure((2.4 * cols, 2.3 * rows))
        for t in range(k):
            ax = fig.add_subplot(rows, cols, t + 1)
            ok = np.isfinite(y[:, t])
            ax.scatter(y[ok, t], pred[ok, t], s=4, alpha=0.6)
            lo, hi = (float(np.min(y[ok, t])), float(np.max(y[ok, t]))) if ok.any() else (0.0, 1.0)
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
            r2 = metrics["r2_per_target"][t]
            ax.set_title(f"{names[t]}\nR² {r2:.2f}" if r2 is not None else names[t], fontsize=7)
            ax.tick_params(labelsize=6)
        fig.supxlabel("true")
        fig.supylabel("predicted")
        fig.tight_layout()
        files.append(_save_png(fig, os.path.join(out, "test_scatter.png"), 120))
        return files
    multilabel = task == "multi_cls"
    yy = y.reshape(-1).astype(np.int64) if not multilabel else y.astype(np.int64)
    files.append(plot_roc(yy, pred, os.path.join(out, "test_roc.png"), class_names=names, multilabel=multilabel,
                          num_classes=2 if pred.shape[1] == 1 else pred.shape[1], n_boot=min(n_boot, 200),
                          seed=seed, split="test"))
    from sklearn.metrics import precision_recall_curve
    fig = _figure((5, 4))
    ax = fig.add_subplot(1, 1, 1)
    cols = range(pred.shape[1]) if pred.shape[1] > 1 else [0]
    for c in cols:
        pos = (yy[:, c] if multilabel else (yy == (1 if pred.shape[1] == 1 else c))).astype(int)
        if pos.min() == pos.max():
            continue
        prec, rec, _ = precision_recall_curve(pos, pred[:, c])
        name = names[1] if pred.shape[1] == 1 else names[c]
        ax.plot(rec, prec, lw=1, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall per label (test)")
    ax.legend(fontsize=6)
    files.append(_save_png(fig, os.path.join(out, "test_pr.png"), 120))
    return files


def evaluate(model: Any, loader: Any, device: torch.device, args: argparse.Namespace, names: list[str],
             stats: dict[str, Any], n_boot: int | None = None) -> tuple[dict[str, Any], Any, Any]:
    outputs, y, days, _ = engine_vfm.predict(model, loader, device, args.amp)
    metrics, pred = engine_vfm.evaluate(args.task, outputs, y, days, class_names=names,
                                        target_mean=stats.get("mean"), target_std=stats.get("std"),
                                        buckets=args.interval_buckets,
                                        n_boot=args.n_boot if n_boot is None else n_boot, seed=args.seed)
    return metrics, y, pred


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = setup(args)
    train, test, encoder, tfs, found = build_inputs(args, device)
    k = 1 if args.task == "forecasting" else args.num_labels
    if args.task in ("multi_cls", "metric_reg") and train.y.shape[1] != k:
        raise UserError(f"--num_labels {k}: the training labels have {train.y.shape[1]} values per image")
    if args.task == "cls" and found and len(found) != k and not (k == 1 and len(found) == 2):
        raise UserError(f"--num_labels {k}: {args.data_path} has {len(found)} classes ({', '.join(found[:10])}); "
                        f"pass --num_labels {len(found)}")
    names = class_names(args, found, k)
    in_dim = encoder.feature_dim if encoder is not None else int(np.asarray(train.x).shape[1])
    saved: dict[str, Any] = load_head_checkpoint(args.load_from) if args.load_from else {}
    head = build_head(args.task, in_dim, k, args.head_type, args.head_layers, args.max_len)
    if saved:
        try:
            head.load_state_dict(saved["state_dict"], strict=True)
        except RuntimeError as e:
            raise UserError(f"--load_from {args.load_from}: does not fit a {type(head).__name__}({in_dim} -> {k}) "
                            f"head: {str(e).splitlines()[0]}; check --task, --num_labels, --head_type and the "
                            "inputs") from None
    stats: dict[str, Any] = {}
    if args.task == "metric_reg":
        if "target_mean" in saved:
            stats = {"mean": saved["target_mean"].numpy().astype(np.float64),
                     "std": saved["target_std"].numpy().astype(np.float64)}
        else:
            with np.errstate(invalid="ignore"):
                mean, std = np.nanmean(train.y, 0), np.nanstd(train.y, 0)
            stats = {"mean": np.nan_to_num(mean).astype(np.float64),
                     "std": np.where(np.isfinite(std) & (std > 0), std, 1.0).astype(np.float64)}
    model = engine_vfm.Decoder(head, encoder)
    train_loader, test_loader, sampler = loaders(args, train, test, tfs, device)
    out = args.output_dir
    ckpt_path = os.path.join(out, f"checkpoint_{args.checkpoint_key or 'decoder'}_linear.pth")
    logger.info("task %s: %d train / %d test, head %s(%d -> %d)%s", args.task, len(train.ids), len(test.ids),
                type(head).__name__, in_dim, k, f", inputs {', '.join(args.datasets)}" if args.datasets else "")
    if args.test:
        model.to(device)
        metrics, y, pred = evaluate(model, test_loader, device, args, names, stats)
        return finish(args, metrics, y, pred, names, saved, ckpt_path, 0.0, tested=True)

    model, plain = prepare_model(model, args, device)
    lr = args.lr * args.batch_size_per_gpu * get_world_size() / 256.0  # the linear scaling rule
    optimizer = torch.optim.AdamW(plain.head.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    opt = Optimization(optimizer, args.amp)
    forward = engine_vfm.forward_for(args.task, device,
                                     target_mean=torch.as_tensor(stats.get("mean", np.zeros(1)), dtype=torch.float32),
                                     target_std=torch.as_tensor(stats.get("std", np.ones(1)), dtype=torch.float32),
                                     reg_loss=args.reg_loss, pos_weight=args.pos_weight)
    lr_fn = engine_vfm.cosine_lr(optimizer, lr, args.epochs)
    run_logger = RunLogger(out, args.log_dir or os.path.join(out, "tensorboard"))
    if is_main_process():
        write_atomic(os.path.join(out, "config.json"), json.dumps(args_to_dict(args), indent=1).encode("utf-8"))
    training_started(out)
    start = time.time()
    train_stats: dict[str, float] = {}
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        train_stats = engine_vfm.train_one_epoch(model, train_loader, opt, epoch, device, forward, lr_fn,
                                                 run_logger=run_logger, seed=args.seed)
        record: dict[str, Any] = {**{f"train_{k_}": v for k_, v in train_stats.items()}, "epoch": epoch}
        if (epoch + 1) % args.val_freq == 0 and epoch + 1 < args.epochs:
            m, _, _ = evaluate(plain, test_loader, device, args, names, stats, n_boot=0)  # no CIs while monitoring
            record.update({f"test_{k_}": v for k_, v in m.items() if isinstance(v, (int, float)) and v is not None})
            logger.info("epoch %d test (monitoring): %s", epoch, engine_vfm.headline(args.task, m))
        run_logger.json_line(record)
    metrics, y, pred = evaluate(plain, test_loader, device, args, names, stats)
    log_to_tensorboard(run_logger.writer, metrics, args.epochs, prefix="test")
    run_logger.json_line({**{f"test_{k_}": v for k_, v in metrics.items() if isinstance(v, (int, float))},
                          "epoch": args.epochs - 1})
    run_logger.close()
    extra = {"task": args.task, "test_metrics": json.dumps(metrics, allow_nan=False),
             "head": {"type": type(head).__name__, "in_dim": in_dim, "outputs": k}, "class_names": names}
    if stats:
        extra.update(target_mean=torch.as_tensor(stats["mean"]), target_std=torch.as_tensor(stats["std"]))
    if is_main_process():
        save_head_checkpoint(ckpt_path, plain.head, optimizer, args.epochs, args, extra)
    return finish(args, metrics, y, pred, names, {}, ckpt_path, time.time() - start, tested=False)


def finish(args: argparse.Namespace, metrics: dict[str, Any], y: Any, pred: Any, names: list[str],
           saved: dict[str, Any], ckpt_path: str, seconds: float, tested: bool) -> dict[str, Any]:
    out = args.output_dir
    prefix = "test"
    reproduced = None
    if tested and saved.get("test_metrics"):
        before = json.loads(saved["test_metrics"])
        now = json.loads(json.dumps(metrics, allow_nan=False))
        diffs = [k for k in before if before.get(k) != now.get(k)]
        reproduced = not diffs
        if diffs:
            logger.warning("--test: metrics differ from those saved with %s in %s", args.load_from, ", ".join(diffs[:8]))
        else:
            logger.info("--test: the metrics saved with %s are reproduced exactly", args.load_from)
        metrics = {**metrics, "reproduces_saved_metrics": reproduced}
    files: list[str] = []
    if is_main_process():
        files = [*write_metrics(metrics, out, prefix), *save_figures(args.task, metrics, y, pred, names, out,
                                                                    args.n_boot, args.seed)]
    print_summary(f"VisionFM decoder ({args.task}{', --test' if tested else ''})", [
        ("test", engine_vfm.headline(args.task, metrics)),
        ("95% CI", ", ".join(f"{k} {lo:.3f}-{hi:.3f}" for k, (lo, hi) in metrics.get("ci95", {}).items()
                             if lo is not None)),
        ("saved metrics", None if reproduced is None else ("reproduced exactly" if reproduced else "DIFFERENT")),
        ("checkpoint", None if tested else ckpt_path), ("time", f"{seconds:.0f} s" if not tested else None),
        ("outputs", ", ".join(os.path.basename(f) for f in files) + f" in {out}" if files else None)],
        next_cmd=None if tested else f"add --load_from {ckpt_path} --test to evaluate it again")
    cleanup()
    return metrics


if __name__ == "__main__":
    run_main(main, get_args_parser())
