"""Helpers and shared fixtures of the bad-input / bad-output tests (tests/test_bad_input.py,
tests/test_bad_output.py): in-process CLI runs expecting one error line, broken image files, and the data of the
session fixtures `bad_us_tree` / `bad_finetuned` (tests/conftest.py)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from util.cli import run_main

VIT = "vit_micro_patch8"


def one_error_line(capsys: pytest.CaptureFixture, prog_hint: str = "") -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and ": error: " in lines[0], err
    return lines[0]


def run_cli(module, argv: list[str]):
    return run_main(module.main, module.get_args_parser(), argv)


def expect_exit_2(module, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(module, argv)
    assert e.value.code == 2
    return one_error_line(capsys)


def truncated_png(path: Path) -> None:
    Image.new("RGB", (32, 32), (10, 200, 30)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bomb_png(path: Path, side: int = 40000) -> None:
    """A valid PNG header announcing side x side pixels (> Pillow's decompression-bomb limit), no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
