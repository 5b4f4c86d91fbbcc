"""CLIP's byte-pair-encoding tokenizer (the one SLIP and OpenAI CLIP use), with the vocabulary that the
`open_clip_torch` package ships (`bpe_simple_vocab_16e6.txt.gz`), so nothing is downloaded at run time.

The package is only used as the place the vocabulary file lives: it is located without importing
open_clip (whose import pulls in its whole model zoo and takes seconds), and the BPE itself is here.

Ids: 256 byte symbols, the same 256 with the end-of-word mark `</w>`, 48,894 merges, then
start-of-text 49406 and end-of-text 49407 (49,408 in all). A caption becomes `[SOT] + bpe + [EOT]`,
zero-padded to the context length. Text is cleaned as CLIP cleans it: ftfy, HTML entities unescaped
twice, runs of whitespace collapsed, lower-cased.

Over-long captions: SLIP cuts the id list at the context length, which drops EOT; its text tower pools
at the position of the largest id (meant to be EOT), so a cut caption pools at an arbitrary word. Here
the last position is set to EOT instead (OpenAI's `truncate=True`) and the number of cut captions is
returned, so the caller can log it; `compat_truncate=True` reproduces SLIP's cut.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from typing import Iterable, Sequence

import torch

from util.cli import UserError

SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses: the file's first 48,894 rules after its header line
# Words as CLIP splits them before BPE: common English contractions, runs of letters, single digits,
# runs of other non-space symbols. Unlike OpenAI's pattern, literal '<|endoftext|>' text in a caption is
# ordinary text here, so a caption cannot end itself early.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def default_vocab_path() -> str:
    """The vocabulary file inside the installed open_clip_torch package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise UserError(f"CLIP's BPE vocabulary ({VOCAB_FILE}) not found: install it with "
                    f"'pip install open_clip_torch' (it ships the file)")


def _byte_symbols() -> list[str]:
    """One printable character per byte value (CLIP's table): printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) for the characters from U+0100 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy repairs, HTML entities unescaped twice, whitespace collapsed, lower case."""
    import ftfy
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP's BPE: `encode(text)` gives the ids of a caption without SOT/EOT; `__call__` the padded batch."""

    def __init__(self, vocab_path: str | None = None) -> None:
        import regex
        path = vocab_path or default_vocab_path()
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable BPE vocabulary ({e}); reinstall open_clip_torch") from None
        rules = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        if len(rules) != NUM_MERGES or any(len(r) != 2 for r in rules):
            raise UserError(f"{path}: not CLIP's BPE vocabulary (expected {NUM_MERGES} merge rules)")
        self.byte_symbol = _byte_symbols()
        # The vocabulary lists the printable bytes first, then the stand-ins from U+0100 (CLIP's order).
        base = sorted(self.byte_symbol)
        symbols = base + [s + "</w>" for s in base] + ["".join(r) for r in rules]
        symbols += [SOT_TEXT, EOT_TEXT]
        self.encoder = {s: i for i, s in enumerate(symbols)}
        self.decoder = symbols
        self.merge_rank = {r: i for i, r in enumerate(rules)}
        self.sot_id, self.eot_id = self.encoder[SOT_TEXT], self.encoder[EOT_TEXT]
        self.vocab_size = len(symbols)
        self._words = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """Merge the symbols of one word (its last symbol carries `</w>`) by the lowest-ranked rule
        until no rule applies."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.merge_rank.get(p, NUM_MERGES), p) for p in zip(parts, parts[1:]))
            if rank == NUM_MERGES:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):  # every occurrence of the pair, left to right, without overlaps
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption (cleaned), without start/end tokens."""
        ids: list[int] = []
        for word in self._words.findall(clean_text(text)):
            as_symbols = "".join(self.byte_symbol[b] for b in word.encode("utf-8"))
            ids += [self.encoder[p] for p in self._bpe(as_symbols)]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of BPE ids (special tokens and padding dropped); for logs and tests."""
        byte_of = {s: b for b, s in enumerate(self.byte_symbol)}
        data = bytearray()
        for i in ids:
            if 0 < int(i) < self.sot_id:
                symbol = self.decoder[int(i)]
                word_end = symbol.endswith("</w>")
                data += bytes(byte_of[c] for c in (symbol[:-4] if word_end else symbol))
                data += b" " if word_end else b""
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int = 77,
                 compat_truncate: bool = False) -> tuple[torch.Tensor, int]:
        """(ids LongTensor [N, context_length], number of captions cut to fit). A cut caption keeps
        EOT in its last position unless `compat_truncate` (SLIP's cut, which loses it)."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must hold SOT and EOT (>= 2), got {context_length}")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        cut = 0
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > context_length:
                cut += 1
                ids = ids[:context_length]
                if not compat_truncate:
                    ids[-1] = self.eot_id
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out, cut


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_path: str | None = None) -> ClipTokenizer:
    """One tokenizer per vocabulary file and process (building it reads ~49k merge rules)."""
    return ClipTokenizer(vocab_path)


def tokenize(texts: str | Sequence[str], context_length: int = 77,
             compat_truncate: bool = False) -> tuple[torch.Tensor, int]:
    """CLIP token ids [N, context_length] (SOT ... EOT, zero-padded) and the number of captions cut."""
    return get_tokenizer()(texts, context_length, compat_truncate)
