"""Explanations of image classifiers: attention rollout, gradient-weighted relevance, Grad-CAM, overlays,
and a 2-D view of frozen features.

Every map comes from the model's own forward pass: attention probabilities are read from the encoder's
attention layers with their `keep_attn` switch on (models_vit.Attention; never from a second copy of the
ViT), Grad-CAM activations from a forward hook. Models are duck-typed: this module imports no model
family (models_classifier.load_classifier builds classifiers from checkpoints). Maps are `(N, h, w)`
float tensors on the token (or feature-map) grid of the input, min-max normalised per image to [0, 1];
`upsample` brings them to pixel resolution and `overlay` renders them over the de-normalised input.

Methods (`T` tokens, `P` prefix tokens = cls, `A_l` the (N, heads, T, T) attention of block l):

- **rollout** (Abnar & Zuidema 2020): head-fuse A_l (mean by default), optionally zero its weakest
  `discard_ratio` entries (attention to or from the cls token is never discarded), add the residual
  identity and renormalise rows, Â_l = norm(0.5 A_l + 0.5 I); R = Â_L ... Â_1. Class-agnostic.
- **chefer** (Chefer, Gur & Wolf: gradient-weighted attention rollout, the rule of "Generic
  attention-model explainability", ICCV 2021, which simplifies the LRP relevance of their CVPR 2021
  "transformer attribution" to the attention itself): per block Ā_l = mean_heads((∂y_c/∂A_l ⊙ A_l)^+),
  R = I; R ← R + Ā_l R for l = start_layer..L. Class-specific (y_c = the target class logit).
- **gradcam** (Selvaraju et al. 2017) on a conv feature map (N, C, H, W), or on the token grid of a
  transformer layer (tokens reshaped to (N, C, h, w), jacobgil's ViT variant): w_c = mean_hw ∂y_c/∂F_c,
  map = ReLU(sum_c w_c F_c).

Read-out of R (rollout and chefer): with cls pooling the cls row over the patch columns, R[0, P:]. A
model that average-pools its patch tokens (`mae_avg`, `retfound_v2_avg`) has no cls read-out; its pooled
feature is the mean of the patch tokens, so the map is the mean of the patch rows, mean_i R[i, P:]: each
patch token receives 1/L of the head relevance. This extension has no reference counterpart.
A ConvViT (no cls token; attention in its stage-3 `blocks3`) is read out the same way: mean of the rows for
its average pool, row 0 for its first-token pool.

The reference (USPEC `ViT_explanation_generator`) multiplies the gradient by the full LRP relevance of
each attention map; we use the attention itself (ICCV 2021 rule), which needs no relevance-instrumented
copy of every layer. The maps agree in where they put mass but not numerically.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("medfound")

METHODS = ("rollout", "chefer", "gradcam")


# ------------------------------------------------------------------------------------------ helpers
def is_attention(module: nn.Module) -> bool:
    """An attention layer that can keep its probabilities: a `keep_attn` switch and an `attn_probs` slot
    (models_vit.Attention); found by these attributes so that util imports no model family."""
    return hasattr(module, "keep_attn") and hasattr(module, "attn_probs")


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder's attention layers in forward order (decoder blocks of an MAE are skipped)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) and is_attention(getattr(blocks[0], "attn", None)):
        return [b.attn for b in blocks]
    found = [m for name, m in model.named_modules() if is_attention(m) and not name.startswith("decoder")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention layers that keep their probabilities "
                         f"(models_vit.Attention): attention maps need a ViT; use method 'gradcam' for "
                         f"convolutional models")
    return found


@contextlib.contextmanager
def keep_attention(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Switch `keep_attn` on for every encoder attention layer (the explicit-softmax path that keeps the
    probabilities and their gradient), and gradient checkpointing off; restore both afterwards."""
    layers = attention_layers(model)
    saved = [layer.keep_attn for layer in layers]
    ckpt = getattr(model, "grad_checkpointing", None)
    for layer in layers:
        layer.keep_attn, layer.attn_probs = True, None
    if ckpt:
        model.grad_checkpointing = False  # a recomputed forward would replace the kept probabilities
    try:
        yield layers
    finally:
        for layer, s in zip(layers, saved):
            layer.keep_attn, layer.attn_probs = s, None
        if ckpt:
            model.grad_checkpointing = ckpt


def token_grid(model: nn.Module, num_tokens: int, image_size: Sequence[int] | None = None
               ) -> tuple[tuple[int, int], int]:
    """(grid (h, w), number of prefix tokens) for a token sequence of length `num_tokens`; `image_size`
    (H, W) of the input scales the model's built grid, for a ViT run at another input size."""
    grid = getattr(model, "grid_size", None)
    if grid is None and hasattr(model, "patch_embed"):
        grid = getattr(model.patch_embed, "grid_size", None)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "img_size", None)
    if grid is not None and image_size is not None and built is not None:
        stride_h, stride_w = int(built[0]) // int(grid[0]), int(built[1]) // int(grid[1])
        grid = (int(image_size[0]) // stride_h, int(image_size[1]) // stride_w)
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        prefix = num_tokens - h * w
        if prefix >= 0:
            return (h, w), prefix
    for prefix in (1, 0):
        side = int(round((num_tokens - prefix) ** 0.5))
        if side * side == num_tokens - prefix:
            return (side, side), prefix
    raise ValueError(f"cannot arrange {num_tokens} tokens on a square grid; pass a model with `grid_size`")


def default_readout(model: nn.Module) -> str:
    """'cls' (row of the pooled token 0) for cls-pooled models (and ConvViT's first-token pool), 'mean'
    (mean over patch rows) for average-pooled ones."""
    return "cls" if getattr(model, "pool", "cls") in ("cls", "convvit_first") else "mean"


def _read_out(R: torch.Tensor, prefix: int, grid: tuple[int, int], readout: str) -> torch.Tensor:
    if readout == "cls":  # the row of token 0: the cls token, or the first patch token when there is none
        rel = R[:, 0, prefix:]
    elif readout == "mean":
        rel = R[:, prefix:, prefix:].mean(dim=1)
    else:
        raise ValueError(f"readout must be 'cls' or 'mean', got {readout!r}")
    return rel.reshape(rel.shape[0], *grid)


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image min-max to [0, 1] (a constant map becomes all zeros)."""
    flat = maps.reshape(maps.shape[0], -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).reshape(maps.shape)


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W) bilinear; values stay inside the input range ([0, 1] stays [0, 1])."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def target_scores(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The score explained for each image: logit of the class, or +-logit for a one-logit (sigmoid)
    binary head (class 1 = the logit, class 0 = its negation)."""
    if logits.shape[1] == 1:
        return logits[:, 0] * (2.0 * classes.to(logits.dtype) - 1.0)
    return logits.gather(1, classes.view(-1, 1))[:, 0]


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def _as_targets(class_index: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    n = logits.shape[0]
    if class_index is None:
        return predicted_classes(logits.detach())
    t = torch.as_tensor(class_index, device=logits.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"class_index has {t.numel()} entries for {n} images")
    num = max(logits.shape[1], 2)
    if int(t.min()) < 0 or int(t.max()) >= num:
        raise ValueError(f"class index {t.tolist()} out of range for {num} classes")
    return t


# ------------------------------------------------------------------------------------------ rollout
@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor, discard_ratio: float = 0.0, head_fusion: str = "mean",
                      readout: str | None = None, normalize: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention rollout maps (N, h, w) and the logits of the same forward pass."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    was_training = model.training
    model.eval()
    try:
        with keep_attention(model) as layers:
            logits = model(x)
            mats = [layer.attn_probs.float() for layer in layers]
    finally:
        model.train(was_training)
    n, _, t, _ = mats[0].shape
    grid, prefix = token_grid(model, t, x.shape[-2:])
    eye = torch.eye(t, device=x.device).expand(n, t, t)
    R = eye.clone()
    for A in mats:
        if head_fusion == "mean":
            A = A.mean(dim=1)
        elif head_fusion == "max":
            A = A.amax(dim=1)
        elif head_fusion == "min":
            A = A.amin(dim=1)
        else:
            raise ValueError(f"head_fusion must be mean, max or min, got {head_fusion!r}")
        if discard_ratio > 0:
            A = A.clone()
            keep = torch.zeros(t, t, dtype=torch.bool, device=A.device)
            keep[:prefix, :] = True
            keep[:, :prefix] = True  # attention to or from the cls token is never discarded
            cand = A.masked_fill(keep, float("inf")).reshape(n, -1)
            k = int((t * t - int(keep.sum())) * discard_ratio)
            if k > 0:
                idx = cand.topk(k, dim=1, largest=False).indices
                A.reshape(n, -1).scatter_(1, idx, 0.0)
        A = 0.5 * A + 0.5 * eye
        A = A / A.sum(dim=-1, keepdim=True)
        R = A @ R
    maps = _read_out(R, prefix, grid, readout or default_readout(model))
    return (normalize_maps(maps) if normalize else maps), logits


# ------------------------------------------------------------------------------ gradient-weighted
def chefer_relevance(model: nn.Module, x: torch.Tensor, class_index: int | Sequence[int] | torch.Tensor | None = None,
                     start_layer: int = 0, readout: str | None = None, normalize: bool = True,
                     classes: Sequence[int] | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradient-weighted attention relevance (module docstring).

    Explains `class_index` (one int for all images, one per image, or None = each image's predicted
    class), or every class in `classes` from one forward pass. Returns ({class: maps (N, h, w)} with key
    -1 for per-image targets, logits, the per-image target classes used for key -1).
    """
    was_training = model.training
    model.eval()
    x = x.detach().clone().requires_grad_(True)  # a graph even when every parameter is frozen
    out: dict[int, torch.Tensor] = {}
    try:
        with torch.enable_grad(), keep_attention(model) as layers:
            logits = model(x)
            probs = [layer.attn_probs for layer in layers]
            if not 0 <= start_layer < len(probs):
                raise ValueError(f"start_layer must be in [0, {len(probs) - 1}], got {start_layer}")
            targets = _as_targets(class_index, logits)
            jobs: list[tuple[int, torch.Tensor]] = [(-1, targets)] if classes is None else [
                (int(c), _as_targets(int(c), logits)) for c in classes]
            n, _, t, _ = probs[0].shape
            grid, prefix = token_grid(model, t, x.shape[-2:])
            rd = readout or default_readout(model)
            for j, (key, tgt) in enumerate(jobs):
                grads = torch.autograd.grad(target_scores(logits, tgt).sum(), probs, retain_graph=j + 1 < len(jobs))
                R = torch.eye(t, device=x.device).expand(n, t, t).clone()
                for A, G in list(zip(probs, grads))[start_layer:]:
                    cam = (G.float() * A.detach().float()).clamp(min=0).mean(dim=1)
                    R = R + cam @ R
                maps = _read_out(R, prefix, grid, rd)
                out[key] = normalize_maps(maps) if normalize else maps
    finally:
        model.train(was_training)
    return out, logits.detach(), targets


# ----------------------------------------------------------------------------------------- Grad-CAM
def _module(model: nn.Module, name: str) -> nn.Module:
    """A submodule by dotted name; integer parts index ModuleLists (negative allowed: 'blocks.-1.norm1')."""
    m: Any = model
    for part in name.split("."):
        if part.lstrip("-").isdigit():
            m = m[int(part)]
        elif hasattr(m, part):
            m = getattr(m, part)
        else:
            raise ValueError(f"{type(model).__name__} has no layer {name!r} (failed at {part!r})")
    return m


def default_gradcam_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The layer Grad-CAM reads: for a ViT (`blocks` of attention blocks) the first norm of the last
    block, whose tokens reach the read-out through the last attention; otherwise the last module whose
    output is a spatial feature map (N, C, H, W) with H, W > 1 (e.g. a ConvViT's last conv stage)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[-1], "norm1"):
        return f"blocks.{len(blocks) - 1}.norm1"
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if not name:
            continue
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, name=name: order.append(name)
            if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] > 1 and out.shape[-2] > 1 else None))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} produces no spatial feature map; pass target_layer")
    return order[-1]


def gradcam(model: nn.Module, x: torch.Tensor, class_index: int | Sequence[int] | torch.Tensor | None = None,
            target_layer: str | None = None, normalize: bool = True, classes: Sequence[int] | None = None
            ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Grad-CAM maps on a conv feature map or a transformer token grid; same return form as
    `chefer_relevance`."""
    was_training = model.training
    model.eval()
    name = target_layer or default_gradcam_layer(model, x)
    layer = _module(model, name)
    captured: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("act", o[0] if isinstance(o, tuple) else o))
    x = x.detach().clone().requires_grad_(True)
    out: dict[int, torch.Tensor] = {}
    try:
        with torch.enable_grad():
            logits = model(x)
            act = captured["act"]
            targets = _as_targets(class_index, logits)
            jobs = [(-1, targets)] if classes is None else [(int(c), _as_targets(int(c), logits)) for c in classes]
            for j, (key, tgt) in enumerate(jobs):
                (g,) = torch.autograd.grad(target_scores(logits, tgt).sum(), [act], retain_graph=j + 1 < len(jobs))
                a, g = act.detach().float(), g.float()
                if a.ndim == 3:  # tokens (N, T, C) -> (N, C, h, w)
                    grid, prefix = token_grid(model, a.shape[1], x.shape[-2:])
                    a = a[:, prefix:].transpose(1, 2).reshape(a.shape[0], -1, *grid)
                    g = g[:, prefix:].transpose(1, 2).reshape(g.shape[0], -1, *grid)
                elif a.ndim != 4:
                    raise ValueError(f"Grad-CAM layer {name!r} outputs shape {tuple(a.shape)}; need (N, C, H, W) "
                                     f"or (N, tokens, C)")
                weights = g.mean(dim=(2, 3), keepdim=True)
                maps = F.relu((weights * a).sum(dim=1))
                out[key] = normalize_maps(maps) if normalize else maps
    finally:
        hook.remove()
        model.train(was_training)
    return out, logits.detach(), targets


def explain(model: nn.Module, x: torch.Tensor, method: str, class_index: int | Sequence[int] | None = None,
            classes: Sequence[int] | None = None, **options: Any
            ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One entry point for the three methods: ({class or -1: maps (N, h, w) in [0, 1]}, logits, targets).
    Rollout is class-agnostic: its maps are returned under -1 (and under each requested class)."""
    if method == "rollout":
        maps, logits = attention_rollout(model, x, discard_ratio=options.get("discard_ratio", 0.0),
                                         head_fusion=options.get("head_fusion", "mean"),
                                         readout=options.get("readout"))
        keys = [-1] if classes is None else list(classes)
        return {k: maps for k in keys}, logits, _as_targets(class_index, logits)
    if method == "chefer":
        return chefer_relevance(model, x, class_index, start_layer=options.get("start_layer", 0),
                                readout=options.get("readout"), classes=classes)
    if method == "gradcam":
        return gradcam(model, x, class_index, target_layer=options.get("target_layer"), classes=classes)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------ overlay
def to_display(image: torch.Tensor | np.ndarray, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> np.ndarray:
    """An HxWx3 float array in [0, 1] from a normalised (3, H, W) tensor (with mean/std), a [0, 1]
    tensor, or an HxWx3 uint8 / float array."""
    if isinstance(image, torch.Tensor):
        img = image.detach().float().cpu()
        if img.ndim == 4:
            img = img[0]
        if mean is not None and std is not None:  # undo the normalisation (util.vis imports this module)
            img = img * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        arr = img.clamp(0, 1).permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.clip(arr[..., :3], 0.0, 1.0)


def colorize(heatmap: np.ndarray | torch.Tensor, cmap: str = "jet") -> np.ndarray:
    """(H, W) values in [0, 1] -> HxWx3 float RGB through a matplotlib colormap."""
    import matplotlib
    h = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap, np.float32)
    return matplotlib.colormaps[cmap](np.clip(h, 0.0, 1.0))[..., :3].astype(np.float32)


def overlay(image: torch.Tensor | np.ndarray, heatmap: torch.Tensor | np.ndarray, alpha: float = 0.5,
            cmap: str = "jet", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            size: int | None = None) -> np.ndarray:
    """Alpha-blend a colour-mapped heatmap (any (h, w) grid, values in [0, 1]) over the image: HxWx3 uint8.
    The heatmap is upsampled bilinearly to the image size first; `size` first resizes the image (bicubic)
    to size x size, for legible pictures of small inputs."""
    img = to_display(image, mean, std)
    if size is not None and img.shape[:2] != (size, size):
        from PIL import Image
        pil = Image.fromarray(np.round(img * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        img = np.asarray(pil, dtype=np.float32) / 255.0
    heat = torch.as_tensor(np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap),
                           dtype=torch.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (h, w), got shape {tuple(heat.shape)}")
    if tuple(heat.shape) != img.shape[:2]:
        heat = upsample(heat[None], img.shape[:2])[0]
    blend = (1.0 - alpha) * img + alpha * colorize(heat, cmap)
    return np.round(np.clip(blend, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------ loading
def checkpoint_config(ckpt: Any) -> dict[str, Any]:
    """The checkpoint's `args` as a dict (ours store a dict; published ones an argparse.Namespace)."""
    cfg = ckpt.get("args") if isinstance(ckpt, dict) else None
    if cfg is None:
        return {}
    return dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg)) if hasattr(cfg, "__dict__") else {}


def eval_transform(input_size: int, mean: Sequence[float], std: Sequence[float]):
    """The finetuning evaluation transform (resize, centre crop, normalise): maps line up with what the
    classifier saw."""
    from util.finetune_transforms import build_transform
    return build_transform(False, input_size, mean, std)


# -------------------------------------------------------------------------------------- embeddings
def embedding_view(features: np.ndarray | torch.Tensor, labels: Sequence[Any] | np.ndarray, method: str = "pca",
                   path: str | None = None, class_names: Sequence[str] | None = None, seed: int = 0,
                   title: str | None = None, perplexity: float | None = None, dpi: int = 100) -> np.ndarray:
    """2-D coordinates (N, 2) of features by PCA or t-SNE (sklearn), and a scatter PNG coloured by label
    when `path` is given. t-SNE runs on the first 50 principal components when the features are wider;
    its perplexity defaults to min(30, (N - 1) / 3)."""
    from sklearn.decomposition import PCA
    X = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    X = X.reshape(X.shape[0], -1).astype(np.float64)
    n = X.shape[0]
    if n < 3:
        raise ValueError(f"an embedding view needs at least 3 samples, got {n}")
    if method == "pca":
        coords = PCA(n_components=2, random_state=seed).fit_transform(X)
    elif method == "tsne":
        from sklearn.manifold import TSNE
        if X.shape[1] > 50 and n > 50:
            X = PCA(n_components=50, random_state=seed).fit_transform(X)
        perp = perplexity if perplexity is not None else float(min(30.0, max(1.0, (n - 1) / 3.0)))
        coords = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed,
                      learning_rate="auto").fit_transform(X)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    coords = np.asarray(coords, dtype=np.float64)
    if path:
        scatter_png(coords, labels, path, class_names=class_names,
                    title=title or f"{method.upper() if method == 'pca' else 't-SNE'} of {n} feature vectors", dpi=dpi)
    return coords


def scatter_png(coords: np.ndarray, labels: Sequence[Any] | np.ndarray, path: str,
                class_names: Sequence[str] | None = None, title: str = "", dpi: int = 100) -> None:
    """Scatter plot of 2-D points coloured by label (one legend entry per label)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=dpi)
    cmap = matplotlib.colormaps["tab10"]
    for i, lab in enumerate(sorted(set(labels.tolist()), key=str)):
        sel = labels == lab
        name = class_names[int(lab)] if class_names is not None and isinstance(lab, (int, np.integer)) \
            and 0 <= int(lab) < len(class_names) else str(lab)
        ax.scatter(coords[sel, 0], coords[sel, 1], s=12, color=cmap(i % 10), label=name, alpha=0.8,
                   edgecolors="none")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    from util.atomic import write_atomic  # a full disk: one line naming the file, the previous figure intact
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def mask_scores(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean map value inside and outside binary masks (N, H, W); maps are upsampled to the mask size.
    The sanity check of an explanation: a lesion detector's map should be higher inside the lesion."""
    m = masks.float()
    up = upsample(maps, tuple(m.shape[-2:]))
    inside = (up * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp_min(1)
    outside = (up * (1 - m)).sum(dim=(1, 2)) / (1 - m).sum(dim=(1, 2)).clamp_min(1)
    return inside, outside
