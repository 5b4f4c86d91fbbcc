"""Hugging Face text models and tokenizers for the MedSLIP towers, from local files only.

`transformers` is imported here lazily (never at module level), so everything else in medfound runs
without it; `require_transformers()` turns its absence into one line naming the package to install.

A text model is named by a local folder (Hugging Face layout: `config.json`, optionally weights and the
tokenizer's `vocab.txt` / `tokenizer.json`), by a `config.json` file (random weights, tokenizer files next
to it), or by a Hub name that is already in the local Hugging Face cache. Nothing is downloaded: a Hub
name that is not cached is one line saying how to fetch it once.

Tokenisation follows MedSLIP's `AutoTokenizer(..., truncation=True, padding='max_length')`: `[CLS]` +
word pieces + `[SEP]`, cut to the context length with `[SEP]` kept last, padded with the pad id; the
number of captions that were cut is returned so the run can log it.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from util.cli import UserError

TRANSFORMERS_HINT = ("install it with: pip install 'transformers>=4.37' (listed in requirements.txt; only the "
                     "MedSLIP/MedCLIP towers import it)")


def require_transformers(what: str = "the MedSLIP/MedCLIP towers") -> Any:
    """The `transformers` module, or a one-line UserError saying that `what` needs it and how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{what}: needs the Hugging Face 'transformers' package, which is not installed; "
                        f"{TRANSFORMERS_HINT}") from None
    return transformers


def text_source(spec: str, flag: str = "--text_model") -> tuple[str, bool]:
    """(folder or Hub name to read from, whether the weights should be read too) for `spec`: a folder, a
    `config.json` file (its folder; random weights) or a cached Hub name. Bad input is one line."""
    if not spec:
        raise UserError(f"{flag} is required: a local Hugging Face folder (config.json + vocab.txt [+ weights]) "
                        f"or a config.json file")
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise UserError(f"{flag} {spec}: no config.json in this folder (expected a Hugging Face model folder)")
        return spec, _has_weights(spec)
    if os.path.isfile(spec):
        if not spec.endswith(".json"):
            raise UserError(f"{flag} {spec}: expected a folder or a config.json file")
        return os.path.dirname(os.path.abspath(spec)), False
    if not _hub_name(spec):
        raise UserError(f"{flag} {spec}: no such file or folder")
    return spec, True


def _hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)


def _has_weights(folder: str) -> bool:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any(os.path.isfile(os.path.join(folder, n)) for n in names)


def _not_cached(spec: str, flag: str, what: str) -> UserError:
    return UserError(f"{flag} {spec}: {what} is not a local folder and not in the Hugging Face cache (nothing is "
                     f"downloaded at run time); fetch it once, e.g. 'huggingface-cli download {spec} --local-dir "
                     f"DIR', and pass {flag} DIR")


def load_config(spec: str, flag: str = "--text_model") -> Any:
    """The model config of `spec` (folder, config.json or cached Hub name), local files only."""
    transformers = require_transformers()
    path = spec if os.path.isfile(spec) else text_source(spec, flag)[0]
    try:
        if os.path.isfile(path):
            return transformers.AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)), local_files_only=True)
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        if not os.path.exists(path):
            raise _not_cached(spec, flag, "this model") from None
        raise UserError(f"{flag} {spec}: not a readable Hugging Face config ({str(e).splitlines()[0][:160]})") from None


def load_tokenizer(spec: str, flag: str = "--text_model", max_length: int | None = None) -> Any:
    """The tokenizer of `spec` from local files (vocab.txt / tokenizer.json in the folder, or the cache)."""
    transformers = require_transformers()
    source = text_source(spec, flag)[0]
    kw = {"model_max_length": max_length} if max_length else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(source, local_files_only=True, **kw)
    except (OSError, ValueError, TypeError) as e:
        if not os.path.exists(source):
            raise _not_cached(spec, flag, "its tokenizer") from None
        raise UserError(f"{flag} {spec}: no usable tokenizer files in {source} (vocab.txt or tokenizer.json "
                        f"expected; {str(e).splitlines()[0][:120]})") from None


class HFTokenize:
    """`(texts, context_length) -> (ids LongTensor [N, context_length], number cut)` with a Hugging Face
    tokenizer, as MedSLIP calls it (`truncation=True, padding='max_length'`); picklable for loader workers."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.n_special = int(tokenizer.num_special_tokens_to_add(pair=False))

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> tuple[torch.Tensor, int]:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if length <= self.n_special:
            raise ValueError(f"context length {length} leaves no room for words next to {self.n_special} special tokens")
        texts = list(texts)
        ids = self.tokenizer(texts, max_length=length, truncation=True, padding="max_length",
                             return_tensors="pt")["input_ids"].long()
        # The words alone, to count the captions the truncation cut (the run logs the fraction).
        words = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return ids, sum(len(w) > length - self.n_special for w in words)
