"""Finding and identifying model files without loading tensors (no torch import here)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from rdbt_cli.errors import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# Keys that some Cosmos-derived files carry but that are recomputed, never parameters (anima.md §1.1).
IGNORED_KEY_PARTS = ("pos_embedder.", "_extra_state", "accum_")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return (tensor entries, __metadata__) of a safetensors file, checking it is whole.

    Reads only the 8-byte length and the JSON header; the tensor data is checked by size, not read.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: file not found; check the path or run `rdbt models` to see what rdbt finds")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a .safetensors file")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{p}: pickle checkpoints ({p.suffix}) can run arbitrary code and are never loaded; "
            "convert it to .safetensors or download the .safetensors release"
        )
    if p.suffix.lower() == ".gguf":
        raise CheckpointError(f"{p}: GGUF files are not supported yet; use the .safetensors release")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if head[:4] == b"GGUF":
            raise CheckpointError(f"{p}: GGUF files are not supported yet; use the .safetensors release")
        if len(head) < 8:
            raise CheckpointError(f"{p}: file is empty or truncated ({size} bytes); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 200_000_000):
            raise CheckpointError(
                f"{p}: not a safetensors file (bad header length); if it is a pickle checkpoint, convert it to .safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{p}: not a safetensors file (unreadable header); download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors file (header is not a table)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, entry in header.items():
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"{p}: damaged safetensors header at tensor {name!r}; download it again") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{p}: file is truncated ({size:,} bytes, header says {8 + n + end:,}); the download did not finish, fetch it again"
        )
    return header, meta


def strip_prefix(keys, prefixes) -> str:
    """The prefix among `prefixes` that most keys start with (more than 5, as ComfyUI requires), or ''."""
    counts = {pre: sum(1 for k in keys if k.startswith(pre)) for pre in prefixes}
    best = max(counts, key=counts.get, default="")
    return best if counts.get(best, 0) > 5 else ""


def is_ignored_key(key: str) -> bool:
    return any(part in key for part in IGNORED_KEY_PARTS)
