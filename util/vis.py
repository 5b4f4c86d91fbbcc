"""Pictures users look at: reconstruction panels (PNG and TensorBoard), notes under figures, image tiles."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


# Column titles of reconstruction figures. MAE's loss covers the masked patches only, so what the
# decoder outputs for visible patches was never trained; the figure must say so, or readers judge the
# model by those patches.
ORIGINAL = "original"
SHARP_ORIGINAL = "sharp original (target)"
BLURRED_INPUT = "blurred input"
PASTED = "reconstruction + visible"
PASTED_SHARP = "reconstruction + sharp visible"  # deblurring: visible patches of the target, unseen by the model
RAW_UNTRAINED = "raw prediction (visible patches not trained)"
RAW_ALL_TRAINED = "raw prediction (all patches trained)"


def masked_title(mask_ratio: float) -> str:
    return f"masked input ({round(mask_ratio * 100)}% hidden)"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def wrap_text(text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (a longer single word keeps its own line)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            trial = f"{line} {word}".strip()
            if line and measure.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def panel_grid(columns: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
               scale: int = 1, *, title: str | None = None, highlight: str | None = None,
               muted: Sequence[str] = ()) -> np.ndarray:
    """Rows = images, columns = named views; returns an HxWx3 uint8 grid under a row of column titles
    (wrapped to the panel width) and, with `title`, a heading line. The `highlight` column's title is
    drawn in blue and underlined (the view to look at), `muted` columns' titles in grey."""
    names = list(columns)
    views = [denormalize(columns[n].detach().float().cpu(), mean, std) for n in names]
    n, _, h, w = views[0].shape
    h, w = h * scale, w * scale
    pad, line_h = 2, 14
    font = _font(12)
    wrapped = [wrap_text(name, w - 4, font) for name in names]
    col_h = max(len(lines) for lines in wrapped) * line_h + 4
    width = len(names) * (w + pad)
    head = wrap_text(title, width - 6, _font(13)) if title else []
    head_h = len(head) * (line_h + 2) + (8 if head else 0)
    top = head_h + col_h
    grid = np.full((top + n * (h + pad), width, 3), 255, np.uint8)
    for j, v in enumerate(views):
        if scale > 1:
            v = torch.nn.functional.interpolate(v, scale_factor=scale, mode="nearest")
        arr = (v.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for i in range(n):
            y, x = top + i * (h + pad), j * (w + pad)
            grid[y:y + h, x:x + w] = arr[i]
    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(head):
        draw.text((3, 2 + k * (line_h + 2)), line, fill=(0, 0, 0), font=_font(13))
    for j, (name, lines) in enumerate(zip(names, wrapped)):
        color = (0, 70, 170) if name == highlight else (120, 120, 120) if name in muted else (0, 0, 0)
        for k, line in enumerate(lines):
            draw.text((j * (w + pad) + 2, head_h + 1 + k * line_h), line, fill=color, font=font)
        if name == highlight:
            draw.rectangle([j * (w + pad), top - 3, j * (w + pad) + w - 1, top - 2], fill=color)
    return np.array(img)  # writable copy (torch.from_numpy warns on read-only arrays)


def reconstruction_columns(out: dict[str, torch.Tensor], mask_ratio: float, loss_scope: str = "masked",
                           blurred: bool = False) -> dict[str, torch.Tensor]:
    """The columns of a reconstruction figure from `engine_pretrain.reconstruct`'s views, in reading
    order: (blurred input,) original, masked input, reconstruction + visible, raw prediction. The raw
    prediction's title says whether its visible patches were trained (`loss_scope` 'all': deblurring
    models) or not ('masked': MAE, ConvMAE, CrossMAE). With `blurred` the pasted patches come from the
    sharp target, which the model never saw, and the title says so."""
    cols = {BLURRED_INPUT: out["input"]} if blurred else {}
    cols[SHARP_ORIGINAL if blurred else ORIGINAL] = out["target"]
    cols[masked_title(mask_ratio)] = out["masked"]
    cols[PASTED_SHARP if blurred else PASTED] = out["pasted"]
    cols[RAW_ALL_TRAINED if loss_scope == "all" else RAW_UNTRAINED] = out["recon"]
    return cols


def reconstruction_title(mask_ratio: float, loss: float | None = None, loss_scope: str = "masked",
                         model: str | None = None, loss_label: str = "loss") -> str:
    """The heading of a reconstruction figure: model, mask ratio, loss and what the loss covers."""
    parts = [model] if model else []
    parts.append(f"mask ratio {mask_ratio:.2f}")
    if loss is not None:
        parts.append(f"{loss_label} {loss:.4f}")
    what = "MSE on all patches" if loss_scope == "all" else "MSE on the masked patches"
    head = " | ".join(parts) + (f" ({what})" if loss is not None else "")
    if loss_scope == "all":
        return head + "\nThe loss covers all patches: judge the raw prediction against the sharp original."
    return (head + f"\nThe loss covers masked patches only: visible patches are not trained. Judge the model by "
                   f"the masked patches of '{PASTED}'.")


def reconstruction_grid(out: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
                        mask_ratio: float, *, loss: float | None = None, loss_scope: str = "masked",
                        model: str | None = None, blurred: bool = False, scale: int | None = None,
                        loss_label: str = "loss", notes: Sequence[str] = ()) -> np.ndarray:
    """A whole reconstruction figure (HxWx3 uint8) from `engine_pretrain.reconstruct`'s views: titled
    columns (`reconstruction_columns`), the mask ratio and loss in the heading, `notes` underneath.
    `scale` defaults to the magnification that makes panels at least 160 px wide."""
    cols = reconstruction_columns(out, mask_ratio, loss_scope, blurred)
    size = out["target"].shape[-1]
    grid = panel_grid(cols, mean, std, scale=scale or max(1, -(-160 // size)),
                      title=reconstruction_title(mask_ratio, loss, loss_scope, model, loss_label),
                      highlight=RAW_ALL_TRAINED if loss_scope == "all" else PASTED,
                      muted=[RAW_UNTRAINED] if loss_scope != "all" else [])
    for note in notes:
        grid = add_note(grid, note)
    return grid


def add_note(grid: np.ndarray, text: str, color: tuple[int, int, int] = (170, 0, 0)) -> np.ndarray:
    """`grid` with a white band underneath holding `text`, wrapped to the picture's width (HxWx3 uint8).
    Used for caveats that must travel with the figure (e.g. an encoder-only checkpoint)."""
    font = _font(11)
    width = grid.shape[1]
    lines = wrap_text(text, width - 4, font)
    line_h = 13
    band = Image.new("RGB", (width, len(lines) * line_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((2, 2 + i * line_h), line, fill=color, font=font)
    return np.concatenate([np.asarray(grid, dtype=np.uint8), np.array(band)], axis=0)


METHOD_NAMES = {"rollout": "attention rollout", "chefer": "Chefer relevance", "gradcam": "Grad-CAM"}


def format_prob(p: float) -> str:
    """'p = 0.87'; the ends as 'p < 0.01' / 'p > 0.99' rather than a rounded 0.00 / 1.00 that reads as certain."""
    return "p < 0.01" if p < 0.005 else "p > 0.99" if p > 0.995 else f"p = {p:.2f}"


def explanation_title(method: str, class_name: str | None = None, prob: float | None = None,
                      predicted: str | None = None, predicted_prob: float | None = None,
                      image_name: str | None = None) -> str:
    """The heading of an explanation figure: method, the class explained with its probability, and the
    prediction when it is another class. Rollout is class-agnostic, so it names the prediction only."""
    name = METHOD_NAMES.get(method, method)
    pred = "" if predicted is None else f" | predicted '{predicted}'" + (
        "" if predicted_prob is None else f" ({format_prob(predicted_prob)})")
    if method == "rollout" or class_name is None:
        head = (f"{name} (class-agnostic)" if method == "rollout" else name) + pred
    else:
        head = f"{name} for class '{class_name}'" + ("" if prob is None else f" ({format_prob(prob)})")
        head += pred if predicted != class_name else ""
    return head if image_name is None else f"{image_name}: {head}"


def explanation_figure(image: torch.Tensor | np.ndarray, heatmap: torch.Tensor | np.ndarray, title: str,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                       alpha: float = 0.5, cmap: str = "jet", panel: int | None = None,
                       method: str | None = None, min_panel: int = 256) -> np.ndarray:
    """Input | heatmap overlay | colour bar under `title` (HxWx3 uint8). Panels are `panel` px square
    (default: the input's size, but at least `min_panel`: a 32-px input is upscaled bicubically so the
    picture is legible). The map is min-max normalised per image, which the colour bar's label says."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from util.explain import overlay, to_display

    side = max(int(panel or to_display(image).shape[0]), min_panel)
    plain = overlay(image, np.zeros((1, 1)), alpha=0.0, mean=mean, std=std, size=side)
    blend = overlay(image, heatmap, alpha=alpha, cmap=cmap, mean=mean, std=std, size=side)
    dpi = 100
    margin, gap, bar_w, bar_room, sub_h = 10, 10, 14, 78, 22
    # 11 pt at 100 dpi is ~15 px; PIL's default font at 16 px measures a little wider, so lines fit
    lines = wrap_text(title, 2 * side + gap + bar_room, _font(16))
    title_h = 12 + 20 * len(lines)
    W = margin + 2 * side + gap + 12 + bar_w + bar_room
    H = title_h + sub_h + side + margin
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    FigureCanvasAgg(fig)

    def axes(x: float, y_top: float, w: float, h: float):  # pixel box (from the top-left) -> axes
        return fig.add_axes((x / W, 1 - (y_top + h) / H, w / W, h / H))

    overlay_name = f"{METHOD_NAMES.get(method, method)} overlay" if method else "heatmap overlay"
    for k, (arr, sub) in enumerate(((plain, "input"), (blend, overlay_name))):
        ax = axes(margin + k * (side + gap), title_h + sub_h, side, side)
        ax.imshow(arr, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(sub, fontsize=10, pad=4)
    cax = axes(margin + 2 * side + gap + 12, title_h + sub_h, bar_w, side)
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=cax)
    bar.set_label("relevance (per image: 0 = lowest, 1 = highest)", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    fig.text(margin / W, 1 - 8 / H, "\n".join(lines),
             ha="left", va="top", fontsize=11)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.array(rgba[..., :3])


def hstack(images: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """Tiles of equal height side by side on white (HxWx3 uint8)."""
    h = max(im.shape[0] for im in images)
    out = np.full((h, sum(im.shape[1] for im in images) + pad * (len(images) - 1), 3), 255, np.uint8)
    x = 0
    for im in images:
        out[:im.shape[0], x:x + im.shape[1]] = im
        x += im.shape[1] + pad
    return out


def collect_images(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """(path, stem) for image files and every image under folders; stems are unique output-name bases:
    the file name without extension, or for images found in a folder the path relative to it with '/'
    turned into '__' (class_0/001.png -> class_0__001), numbered when two inputs still collide."""
    from util.cli import UserError
    from util.data import IMG_EXTENSIONS, list_images
    found: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            files = list_images(item)
            if not files:
                raise UserError(f"{item}: no images found (extensions: {', '.join(IMG_EXTENSIONS)})")
            for f in files:
                rel = os.path.splitext(os.path.relpath(f, item))[0]
                found.append((f, rel.replace(os.sep, "__")))
        elif os.path.isfile(item):
            found.append((item, os.path.splitext(os.path.basename(item))[0]))
        elif os.path.exists(item):  # a FIFO, socket or device: never opened (a FIFO would block the reader)
            raise UserError(f"{item}: not a regular file or folder; pass image files or folders")
        else:
            raise UserError(f"{item}: no such image file or folder")
    seen: dict[str, int] = {}
    out = []
    for path, stem in found:
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append((path, stem if n == 0 else f"{stem}_{n}"))
    return out


def save_png(arr: np.ndarray, path: str) -> None:
    """Write through util.atomic.write_atomic, so a viewer never opens a half-written picture and a full
    disk is one line naming the file (the previous figure intact)."""
    from util.atomic import write_atomic
    write_atomic(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))
