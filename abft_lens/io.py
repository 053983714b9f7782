"""Atomic file writes: a result is either complete on disk or not there at all; output paths checked first."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from abft_lens.errors import AbftLensError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(handle, 0o666 & ~umask)  # mkstemp creates 0600; results should be as readable as any file
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a log that survives a crash up to its last line)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """Refuse an output path that cannot become a file (an existing folder, or a path under a file) before
    any computation runs, instead of failing at the end with ``IsADirectoryError``."""
    path = Path(path)
    if path.is_dir():
        raise AbftLensError(f"{option} {path} is a folder; it must name a file.",
                            f"pass a file name, e.g. {option} {path / 'result.json'}.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AbftLensError(f"{option} {path} lies under {parent}, which is a file.", "choose another path.")
            break
    return path
