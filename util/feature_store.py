"""Frozen-encoder features on disk: a few safetensors shards per split plus a JSON manifest.

Layout under a feature root (VisionFM's `--dst_root`)::

    <root>/<split>/features-r<rank>-<k:04d>.safetensors   shard k written by process <rank>
    <root>/<split>/extraction.json                          what is being extracted (written first)
    <root>/<split>/manifest.json                            counts, encoder, pooling, labels (written last)

A shard holds `features` [n, D] (float32 or float16), `labels` [n, ...] (float32, NaN = missing) and
`extra.<name>` [n] per-sample fields (e.g. the augmentation epoch, a time interval in days); its
metadata holds the n sample stems (JSON). Every file is written atomically (temp file + rename), so a
shard on disk is always complete: an interrupted extraction restarts from the shards present, and the
stems they hold are skipped. The manifest is written only when a split is complete; `read_features`
refuses a split without one.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from util.atomic import write_atomic
from util.cli import UserError

logger = logging.getLogger("medfound")

FORMAT = "medfound-features"
VERSION = 1
MANIFEST = "manifest.json"
EXTRACTION = "extraction.json"
SHARD_RE = re.compile(r"^features-r(\d+)-(\d{4,})\.safetensors$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class FeatureSet(NamedTuple):
    """One split's features, ordered by stem."""
    stems: list[str]
    features: torch.Tensor          # [N, D]
    labels: torch.Tensor            # [N, ...] float32, NaN = missing
    extra: dict[str, torch.Tensor]  # name -> [N]
    meta: dict[str, Any]            # the manifest


def split_dir(root: str, split: str) -> str:
    return os.path.join(root, split)


def shard_name(rank: int, k: int) -> str:
    return f"features-r{rank}-{k:04d}.safetensors"


def list_shards(root: str, split: str) -> list[str]:
    """Complete shard files of a split (temp files of an interrupted write never match), sorted."""
    d = split_dir(root, split)
    if not os.path.isdir(d):
        return []
    return sorted(n for n in os.listdir(d) if SHARD_RE.match(n))


def _shard_stems(path: str) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
        raise UserError(f"{path}: unreadable feature shard ({type(e).__name__}: {e}); delete it and rerun the "
                        "extraction to write it again") from None
    if meta.get("format") != FORMAT or "stems" not in meta:
        raise UserError(f"{path}: not a medfound feature shard (no stems in its metadata)")
    return json.loads(meta["stems"])


def completed_stems(root: str, split: str) -> set[str]:
    """Stems already in complete shards (an extraction skips them when it resumes)."""
    done: set[str] = set()
    for name in list_shards(root, split):
        done.update(_shard_stems(os.path.join(split_dir(root, split), name)))
    return done


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete it and rerun the extraction") from None


def write_json(path: str, record: Mapping[str, Any]) -> None:
    write_atomic(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def claim_split(root: str, split: str, signature: Mapping[str, Any]) -> None:
    """Record what this extraction writes into `root/split` (rank 0, before any shard); an earlier
    extraction of other settings there is refused instead of mixed with this one."""
    path = os.path.join(split_dir(root, split), EXTRACTION)
    before = read_json(path)
    if before is not None:
        differ = sorted(k for k in set(before) | set(signature) if before.get(k) != signature.get(k))
        if differ:
            shown = "; ".join(f"{k}: {before.get(k)!r} there, {signature.get(k)!r} now" for k in differ[:3])
            raise UserError(f"{split_dir(root, split)} holds features of another extraction ({shown}); choose "
                            "another --dst_root or delete that folder")
        return
    if list_shards(root, split):
        raise UserError(f"{split_dir(root, split)} holds feature shards of an unknown extraction; choose another "
                        "--dst_root or delete them")
    write_json(path, dict(signature))


class FeatureWriter:
    """Appends samples of one rank and split, writing a shard every `shard_size` samples.

    Shard numbers continue after this rank's existing shards, so a resumed extraction never overwrites
    one. `MEDFOUND_TEST_KILL_AT_SHARD=k` SIGKILLs the process right after its k-th shard (tests)."""

    def __init__(self, out_dir: str, split: str, rank: int = 0, shard_size: int = 4096,
                 dtype: str | torch.dtype = torch.float32) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.dir = split_dir(out_dir, split)
        self.split, self.rank, self.shard_size = split, int(rank), int(shard_size)
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        os.makedirs(self.dir, exist_ok=True)
        mine = [int(m.group(2)) for m in map(SHARD_RE.match, list_shards(out_dir, split))
                if m and int(m.group(1)) == self.rank]
        self.next_k = max(mine) + 1 if mine else 0
        self._sweep_temps()
        self._stems: list[str] = []
        self._feats: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._extra: dict[str, list[torch.Tensor]] = {}
        self.written: list[str] = []
        self.count = 0

    def _sweep_temps(self) -> None:
        """Temp files this rank left when it was killed mid-write (other ranks' temps are theirs)."""
        prefix = f".features-r{self.rank}-"
        for n in os.listdir(self.dir):
            if n.startswith(prefix) and n.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.dir, n))
                except OSError:
                    pass

    def add(self, stems: Sequence[str], features: torch.Tensor, labels: torch.Tensor,
            extra: Mapping[str, torch.Tensor] | None = None) -> None:
        n = len(stems)
        if features.shape[0] != n or labels.shape[0] != n:
            raise ValueError(f"{n} stems but {features.shape[0]} features and {labels.shape[0]} labels")
        extra = dict(extra or {})
        if self._stems and set(extra) != set(self._extra):
            raise ValueError(f"extra fields changed: {sorted(extra)} vs {sorted(self._extra)}")
        self._stems.extend(stems)
        self._feats.append(features.detach().to("cpu", self.dtype))
        self._labels.append(labels.detach().to("cpu", torch.float32))
        for k, v in extra.items():
            self._extra.setdefault(k, []).append(torch.as_tensor(v).detach().cpu())
        while len(self._stems) >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        if self._stems:
            self._write(len(self._stems))

    close = flush

    def _write(self, n: int) -> None:
        from safetensors.torch import save
        feats, labels = torch.cat(self._feats), torch.cat(self._labels)
        extra = {k: torch.cat(v) for k, v in self._extra.items()}
        tensors = {"features": feats[:n].contiguous(), "labels": labels[:n].contiguous()}
        tensors.update({f"extra.{k}": v[:n].contiguous() for k, v in extra.items()})
        stems = self._stems[:n]
        meta = {"format": FORMAT, "version": str(VERSION), "split": self.split, "rank": str(self.rank),
                "stems": json.dumps(stems)}
        path = os.path.join(self.dir, shard_name(self.rank, self.next_k))
        write_atomic(path, save(tensors, metadata=meta), fsync=False)
        self.next_k += 1
        self.written.append(path)
        self.count += n
        self._stems = self._stems[n:]
        self._feats, self._labels = [feats[n:]], [labels[n:]]
        self._extra = {k: [v[n:]] for k, v in extra.items()}
        if os.environ.get("MEDFOUND_TEST_KILL_AT_SHARD") == str(len(self.written)):
            import signal
            os.kill(os.getpid(), signal.SIGKILL)


def write_manifest(root: str, split: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank has flushed: count the split's shards and write its manifest last."""
    shards = list_shards(root, split)
    count, dim = 0, None
    from safetensors import safe_open
    for name in shards:
        path = os.path.join(split_dir(root, split), name)
        count += len(_shard_stems(path))
        with safe_open(path, framework="pt") as f:
            shape = f.get_slice("features").get_shape()
        dim = shape[1] if len(shape) > 1 else 1
    record = {"format": FORMAT, "version": VERSION, "split": split, "count": count, "shards": shards,
              "feature_dim": dim, **dict(meta)}
    write_json(os.path.join(split_dir(root, split), MANIFEST), record)
    return record


def available_splits(root: str) -> list[str]:
    """Splits of a feature root that have a manifest (complete extractions)."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, MANIFEST)))


def read_features(root: str, split: str) -> FeatureSet:
    """A complete split of a feature root, ordered by stem (a stem listed twice is an error)."""
    from safetensors.torch import load_file
    from util.label_layouts import normalize_split
    if not os.path.isdir(root):
        raise UserError(f"{root}: no such feature folder; extract features first (main_vfm_features.py --dst_root)")
    name = split if os.path.isdir(split_dir(root, split)) else normalize_split(split)
    meta = read_json(os.path.join(split_dir(root, name), MANIFEST))
    if meta is None:
        have = available_splits(root)
        state = "is incomplete (no manifest.json): rerun the extraction with the same flags to finish it" \
            if list_shards(root, name) else f"does not exist (complete splits: {', '.join(have) or 'none'})"
        raise UserError(f"{split_dir(root, name)}: the {name} split {state}")
    if meta.get("format") != FORMAT:
        raise UserError(f"{os.path.join(split_dir(root, name), MANIFEST)}: not a medfound feature manifest")
    stems: list[str] = []
    feats, labels, extra = [], [], {}
    for shard in meta["shards"]:
        path = os.path.join(split_dir(root, name), shard)
        if not os.path.isfile(path):
            raise UserError(f"{path}: listed in the manifest but missing; rerun the extraction")
        s = _shard_stems(path)
        t = load_file(path)
        stems.extend(s)
        feats.append(t["features"])
        labels.append(t["labels"])
        for k, v in t.items():
            if k.startswith("extra."):
                extra.setdefault(k[len("extra."):], []).append(v)
    if not stems:
        raise UserError(f"{split_dir(root, name)}: the {name} split holds no samples")
    order = sorted(range(len(stems)), key=stems.__getitem__)
    stems = [stems[i] for i in order]
    dup = next((a for a, b in zip(stems, stems[1:]) if a == b), None)
    if dup is not None:
        raise UserError(f"{split_dir(root, name)}: sample {dup!r} occurs in more than one shard; delete the folder "
                        "and extract again")
    idx = torch.tensor(order, dtype=torch.long)
    return FeatureSet(stems, torch.cat(feats)[idx], torch.cat(labels)[idx],
                      {k: torch.cat(v)[idx] for k, v in extra.items()}, meta)
