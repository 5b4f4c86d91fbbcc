"""MedCLIP's towers and MedSLIP's model: the SLIP objective on a MedCLIP pair of towers.

Vision (both give a [B, 512] projection, `out_dim = 512`):
- `MedCLIPVisionSwin`: timm's `swin_tiny_patch4_window7_224` (`num_classes=0`: final LayerNorm, mean over
  tokens = Hugging Face SwinModel's `pooler_output`, 768) -> `projection_head` Linear(768, 512, no bias).
  MedCLIP stores this tower as a Hugging Face SwinModel (`model.embeddings.*`, `model.encoder.layers.*`,
  `model.layernorm.*`); such keys are converted to timm's on load (`hf_swin_to_timm`, run by a
  load_state_dict pre-hook, so a MedCLIP or MedSLIP file loads into any module holding this tower).
- `MedCLIPVisionResNet`: torchvision's resnet50 with `fc` = Linear(2048, 512, no bias), keys `model.*`.
A one-channel (grey) input is repeated to three channels, as MedCLIP does.

Text: `MedCLIPTextBert`, a Hugging Face encoder (`model.*`, BioClinicalBERT in MedCLIP) whose embedding is
the mean of hidden states [1], [2] and [-1] (the outputs of the first, second and last layers) averaged
over ALL positions, padding included (MedCLIP's pooling; `pooling='masked'` averages over the attention
mask instead) -> `projection_head` Linear(hidden, 512, no bias). The encoder's own pooler is unused by this
pooling; it is kept (its keys are in MedCLIP's files) but frozen. `embeddings.position_ids`, which
transformers releases add or remove, is dropped from incoming state dicts before the strict load.

`MedCLIPModel`: `vision_model`, `text_model`, `logit_scale` = ln(1/0.07); `encode_image` / `encode_text` are
L2-normalised. `MedSLIP`: `MedCLIP_model`, SimCLR's `image_mlp` on the 512-d vision projection for the
two augmented views, and SLIP's own `logit_scale` for the CLIP loss (MedCLIP's stays, frozen, for its
keys). SLIP's unused ViT and text transformer are never built; their keys in MedSLIP's checkpoint.pt
(`visual.*`, `transformer.*`, `token_embedding`, `positional_embedding`, `ln_final`, `*_projection`)
are dropped on load (`medslip_state_dict`).

transformers is imported only when a text tower is built (util.hf_text); the vision towers need timm and
torchvision only.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from models_slip import build_image_mlp
from util.cli import UserError
from util.registry import register

EMBED_DIM = 512
MEDCLIP_MEAN, MEDCLIP_STD = 0.5863, 0.2795  # grey-level statistics MedCLIP's images were normalised with
SWIN_NAME = "swin_tiny_patch4_window7_224"
# Tiny Swin for tests: 32 px, patch 4, window 4, two stages (16 -> 32 channels).
SWIN_MICRO = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ----------------------------------------------------------------------------- HF Swin -> timm keys
# Block sub-keys of Hugging Face's SwinModel (transformers 4.x names, then 5.x names) -> timm's.
_BLOCK_KEYS = [
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
]
_QKV = {"attention.self.query.": 0, "attention.self.key.": 1, "attention.self.value.": 2,
        "attention.q_proj.": 0, "attention.k_proj.": 1, "attention.v_proj.": 2}


def is_hf_swin(sd: Mapping[str, Any], prefix: str = "") -> bool:
    """Whether `sd` holds a Hugging Face SwinModel under `prefix` (its `embeddings.patch_embeddings` key)."""
    return f"{prefix}embeddings.patch_embeddings.projection.weight" in sd


def _merge_order(dim: int) -> torch.Tensor:
    """For timm's PatchMerging on `dim` channels: position j of its 4*dim merged vector holds the element
    at position order[j] of Hugging Face's. Found by running timm's own merge on a 2x2 grid of labelled
    values (norm and reduction replaced by identities), so it holds whatever order a timm release uses.
    Hugging Face concatenates [(row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)] x dim."""
    from timm.models.swin_transformer import PatchMerging
    probe = PatchMerging(dim)
    probe.norm, probe.reduction = nn.Identity(), nn.Identity()
    grid = torch.arange(4 * dim, dtype=torch.float64).reshape(1, 2, 2, dim)  # value = (row*2 + col)*dim + c
    src = probe(grid).reshape(-1).long()
    row, col, c = src // (2 * dim), (src // dim) % 2, src % dim
    return (col * 2 + row) * dim + c


def hf_swin_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face SwinModel state dict (transformers 4.x or 5.x names) with timm 1.x's names and layout:
    q/k/v concatenated into `attn.qkv`; each stage's patch merging moved from the end of stage i
    (`encoder.layers.i.downsample`) to the start of stage i+1 (`layers.{i+1}.downsample`), its channels in
    timm's order; `relative_position_index` buffers dropped (timm recomputes them). Keys it does not know
    are kept as they are, so a strict load names them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}
    for key, v in sd.items():
        if key.endswith("relative_position_index"):
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)", key)
        if m:
            base, rest = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            part = next((p for p in _QKV if rest.startswith(p)), None)
            if part is not None:
                kind = rest[len(part):]  # weight / bias
                qkv.setdefault(f"{base}attn.qkv.{kind}", [None] * 3)[_QKV[part]] = v
                continue
            new = next((rest.replace(a, b, 1) for a, b in _BLOCK_KEYS if rest.startswith(a)), rest)
            out[base + new] = v
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)$", key)
        if m:
            order = _merge_order(v.shape[-1] // 4)
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = v[..., order].contiguous()
            continue
        for a, b in (("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
                     ("embeddings.norm.", "patch_embed.norm."), ("layernorm.", "norm.")):
            if key.startswith(a):
                key = b + key[len(a):]
                break
        out[key] = v
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise UserError(f"Swin weights: {key} lacks one of query/key/value")
        out[key] = torch.cat(parts, dim=0)
    return out


def _swin_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Rewrite a Hugging Face Swin under `prefix + 'model.'` into timm's keys, in place, before loading."""
    inner = prefix + "model."
    if not is_hf_swin(state_dict, inner):
        return
    hf = {k[len(inner):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(inner)]}
    state_dict.update({inner + k: v for k, v in hf_swin_to_timm(hf).items()})


def _drop_position_ids(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Drop `embeddings.position_ids` (a buffer some transformers releases save and others do not)."""
    for k in [k for k in state_dict if k.startswith(prefix) and k.endswith("embeddings.position_ids")]:
        del state_dict[k]


# ------------------------------------------------------------------------------------------ towers
class MedCLIPVisionSwin(nn.Module):
    """timm Swin-T (pooled features) -> `projection_head` (no bias) -> [B, 512]; loads MedCLIP's HF Swin keys."""

    def __init__(self, proj_dim: int = EMBED_DIM, **swin_kw: Any) -> None:
        super().__init__()
        import timm
        self.model = timm.create_model(SWIN_NAME, pretrained=False, num_classes=0, **swin_kw)
        self.projection_head = nn.Linear(self.model.num_features, proj_dim, bias=False)
        self.out_dim = proj_dim
        self.register_load_state_dict_pre_hook(_swin_pre_hook)

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        feats = self.model(_as_rgb(x))
        return self.projection_head(feats) if project else feats


class MedCLIPVisionResNet(nn.Module):
    """torchvision ResNet (resnet50 in MedCLIP) whose `fc` is the projection: Linear(2048, 512, no bias)."""

    def __init__(self, proj_dim: int = EMBED_DIM, arch: str = "resnet50") -> None:
        super().__init__()
        import torchvision
        self.model = getattr(torchvision.models, arch)(weights=None)
        self.model.fc = nn.Linear(self.model.fc.in_features, proj_dim, bias=False)
        self.out_dim = proj_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_as_rgb(x))


class MedCLIPTextBert(nn.Module):
    """A Hugging Face encoder (`model`) with MedCLIP's pooling and `projection_head` (no bias) -> [B, 512].

    `source`: a transformers config object, a local model folder (weights read when present), a
    config.json file (random weights) or a Hub name in the local cache. `pooling`: 'medclip' (mean over
    all positions, padding included) or 'masked' (mean over the attention mask's positions)."""

    def __init__(self, source: Any, proj_dim: int = EMBED_DIM, pooling: str = "medclip") -> None:
        super().__init__()
        from util.hf_text import load_config, require_transformers, text_source
        transformers = require_transformers()
        if pooling not in ("medclip", "masked"):
            raise UserError(f"--text_pooling {pooling}: choose medclip or masked")
        if isinstance(source, transformers.PretrainedConfig):
            self.model = transformers.AutoModel.from_config(source)
        else:
            folder, with_weights = text_source(str(source))
            if with_weights:
                try:
                    self.model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
                except OSError as e:
                    raise UserError(f"--text_model {source}: weights not readable from {folder} "
                                    f"({str(e).splitlines()[0][:160]})") from None
            else:
                self.model = transformers.AutoModel.from_config(load_config(str(source)))
        config = self.model.config
        if getattr(config, "num_hidden_layers", 0) < 2:
            raise UserError("--text_model: MedCLIP's pooling reads the outputs of layers 1, 2 and the last; the "
                            "encoder needs at least 2 layers")
        self.pooling = pooling
        self.pad_token_id = int(config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0)
        self.max_length = int(getattr(config, "max_position_embeddings", 512))
        self.projection_head = nn.Linear(config.hidden_size, proj_dim, bias=False)
        self.out_dim = proj_dim
        pooler = getattr(self.model, "pooler", None)
        if pooler is not None:  # not used by this pooling: frozen, so data parallelism sees no unused gradient
            pooler.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def pool(self, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, hidden]: mean of hidden states 1, 2 and -1, averaged over positions (see `pooling`)."""
        layers = torch.stack([hidden_states[1], hidden_states[2], hidden_states[-1]]).mean(0)  # [B, L, H]
        if self.pooling == "medclip":
            return layers.mean(1)
        m = attention_mask.to(layers.dtype).unsqueeze(-1)
        return (layers * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return self.projection_head(self.pool(out.hidden_states, attention_mask))


class MedCLIPModel(nn.Module):
    """MedCLIP's pair of towers with L2-normalised embeddings and a learned logit scale (init ln(1/0.07))."""

    def __init__(self, vision_model: nn.Module, text_model: nn.Module, logit_scale_init: float = 0.07) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.text_model = text_model
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / logit_scale_init)))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_model(pixel_values), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_model(input_ids, attention_mask), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"image_embed": self.encode_image(pixel_values), "text_embed": self.encode_text(input_ids, attention_mask),
                "logit_scale": self.logit_scale.exp()}


def build_vision_tower(kind: str, img_size: int | None = None, **kw: Any) -> nn.Module:
    """MedCLIP's vision tower by kind: 'swin' (MedCLIP calls it 'vit') or 'resnet'; `kw` reaches timm/torchvision."""
    kind = kind.lower()
    if kind in ("vit", "swin"):
        return MedCLIPVisionSwin(**({"img_size": img_size} if img_size else {}), **kw)
    if kind in ("resnet", "resnet50"):
        return MedCLIPVisionResNet(**kw)
    raise UserError(f"MedCLIP vision tower {kind!r}: choose vit (= swin) or resnet")


def _vision_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's own keys from any MedCLIP-family file: image_encoder.pth (`model.*`,
    `projection_head.weight`), MedCLIP's pytorch_model.bin (`vision_model.*`) or MedSLIP's checkpoint.pt
    (`[module.]MedCLIP_model.vision_model.*`)."""
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    for prefix in ("MedCLIP_model.vision_model.", "vision_model."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _weight_dict(path: str, flag: str) -> dict[str, torch.Tensor]:
    from util.checkpoint_files import CheckpointError, load_file
    ckpt = load_file(path, flag=flag)
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{flag} {path}: no weight dictionary found")
    return ckpt


def _strict_load(module: nn.Module, sd: Mapping[str, torch.Tensor], where: str, hint: str) -> None:
    """load_state_dict(strict) with a one-line error naming the file, the first odd keys and a hint."""
    try:
        module.load_state_dict(dict(sd), strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"{where}: does not fit {type(module).__name__} ({detail[:300]}); {hint}") from None


def build_medclip_vision(kind: str, weights: str | None = None, flag: str = "weights", **kw: Any) -> nn.Module:
    """MedCLIP's vision tower returning [B, 512] (`out_dim` = 512): `kind` 'vit' or 'swin' (Swin-T) or
    'resnet' (ResNet-50); `weights` (optional) is read strictly from image_encoder.pth /
    best_image_encoder.pth (the tower's state dict: `model.*`, `projection_head.weight`), a MedCLIP
    pytorch_model.bin (`vision_model.*`) or a MedSLIP checkpoint.pt (`module.MedCLIP_model.vision_model.*`);
    Hugging Face Swin keys are converted to timm's. `flag` names the option in error messages; `kw`
    (e.g. img_size, timm sizes) reaches the tower."""
    tower = build_vision_tower(kind, **kw)
    if weights:
        other = "resnet" if isinstance(tower, MedCLIPVisionSwin) else "swin"
        _strict_load(tower, _vision_keys(_weight_dict(weights, flag)), f"{flag} {weights}",
                     f"are these {other} weights (MedCLIP's ViT is a Swin-T)?")
    return tower


# ------------------------------------------------------------------------------------------- MedSLIP
# Keys of the SLIP towers that MedSLIP's model carries unused (never built here).
UNUSED_SLIP_PREFIXES = ("visual.", "transformer.", "token_embedding", "positional_embedding", "ln_final",
                        "image_projection", "text_projection")


def medslip_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MedSLIP checkpoint's `state_dict` with our keys: `module.` stripped, the unused SLIP towers' keys
    dropped, `embeddings.position_ids` dropped."""
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith(UNUSED_SLIP_PREFIXES) or k.endswith("embeddings.position_ids"):
            continue
        out[k] = v
    return out


class MedSLIP(nn.Module):
    """SLIP's objective on MedCLIP's towers: CLIP loss on MedCLIP's normalised embeddings scaled by SLIP's
    `logit_scale`; SimCLR's `image_mlp` on the vision tower's 512-d projection of the two views.
    `forward(image, text, aug1, aug2)` returns what SLIP's does; text is token ids whose padding (the
    tokenizer's pad id) defines the attention mask."""

    def __init__(self, vision: str, text_source: Any, ssl_mlp_dim: int = 4096, ssl_emb_dim: int = 256,
                 text_pooling: str = "medclip", img_size: int | None = None, vision_kw: dict | None = None) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.MedCLIP_model = MedCLIPModel(build_vision_tower(vision, img_size, **(vision_kw or {})),
                                          MedCLIPTextBert(text_source, pooling=text_pooling))
        self.MedCLIP_model.logit_scale.requires_grad_(False)  # SLIP's own scale is the one trained
        self.image_mlp = build_image_mlp(EMBED_DIM, ssl_mlp_dim, ssl_emb_dim)

    @property
    def pad_token_id(self) -> int:
        return self.MedCLIP_model.text_model.pad_token_id

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.MedCLIP_model.encode_image(image)

    def encode_text(self, text: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.MedCLIP_model.encode_text(text, attention_mask)

    def forward(self, image: torch.Tensor, text: torch.Tensor, aug1: torch.Tensor | None = None,
                aug2: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {"image_embed": self.encode_image(image), "text_embed": self.encode_text(text, attention_mask),
               "logit_scale": self.logit_scale.exp()}
        if (aug1 is None) != (aug2 is None):
            raise ValueError("MedSLIP needs both SimCLR views (aug1 and aug2) or neither")
        if aug1 is not None:
            vision = self.MedCLIP_model.vision_model
            out["aug1_embed"] = self.image_mlp(vision(aug1))
            out["aug2_embed"] = self.image_mlp(vision(aug2))
        return out


def load_medclip_weights(model: MedSLIP, path: str, flag: str = "--medclip_weights") -> str:
    """Initial weights for a MedSLIP model, read strictly: MedCLIP's pytorch_model.bin (`vision_model.*`,
    `text_model.*`, `logit_scale`) into `MedCLIP_model`, or a MedSLIP checkpoint.pt (SLIP's keys +
    `MedCLIP_model.*`) into the whole model, the unused SLIP towers ignored. Returns which it was."""
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in _weight_dict(path, flag).items()}
    hint = "is --model the tower these weights were trained with (Swin or ResNet), and --text_model their text encoder?"
    if any(k.startswith("MedCLIP_model.") for k in sd):
        _strict_load(model, medslip_state_dict(sd), f"{flag} {path}", hint)
        return "medslip"
    if any(k.startswith("vision_model.") for k in sd) and any(k.startswith("text_model.") for k in sd):
        _strict_load(model.MedCLIP_model, {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")},
                     f"{flag} {path}", hint)
        return "medclip"
    raise UserError(f"{flag} {path}: neither MedCLIP's pytorch_model.bin (vision_model.*, text_model.*) nor a MedSLIP "
                    f"checkpoint (MedCLIP_model.*); keys look like {sorted(sd)[:3]}")


def _medslip(vision: str, text_model: str | Any = "emilyalsentzer/Bio_ClinicalBERT", ssl_mlp_dim: int = 4096,
             ssl_emb_dim: int = 256, text_pooling: str = "medclip", img_size: int | None = None,
             **vision_kw: Any) -> MedSLIP:
    return MedSLIP(vision, text_model, ssl_mlp_dim, ssl_emb_dim, text_pooling, img_size, vision_kw)


@register()
def MedSLIP_SWIN(**kw: Any) -> MedSLIP:
    """MedSLIP with MedCLIP's Swin-T vision tower ("MedCLIP-ViT") and a BERT text tower (`text_model`)."""
    return _medslip("swin", **kw)


@register()
def MedSLIP_RESNET50(**kw: Any) -> MedSLIP:
    """MedSLIP with MedCLIP's ResNet-50 vision tower and a BERT text tower (`text_model`)."""
    kw.pop("img_size", None)
    return _medslip("resnet", **kw)


@register()
def MedSLIP_SWIN_MICRO(**kw: Any) -> MedSLIP:
    """Test size: Swin D 16, depths (2, 2), window 4 at 32 px; image MLP 128 -> 32; a small `text_model`."""
    kw.setdefault("ssl_mlp_dim", 128)
    kw.setdefault("ssl_emb_dim", 32)
    kw.setdefault("img_size", 32)
    return _medslip("swin", **{**SWIN_MICRO, **kw})
