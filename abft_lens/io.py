"""Atomic file writes: a result is either complete on disk or not there at all; checked JSON reads; output paths
checked first."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from abft_lens.errors import AbftLensError

NUMBER = (int, float)


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


# ------------------------------------------------------------------------------------------ checked reads


class Values:
    """A shape: a JSON object whose every value has ``shape``."""

    def __init__(self, shape):
        self.shape = shape


class Maybe:
    """A shape: ``null`` or ``shape``."""

    def __init__(self, shape):
        self.shape = shape


def shape_problem(value, shape, where: str = "it") -> str | None:
    """Why ``value`` (parsed JSON) does not have ``shape``, or None. A shape is a type or a tuple of types (a
    bool is never a number), ``{key: shape}`` (an object with at least these keys; a key ending in ``?`` may be
    missing), ``[shape]`` (an array of such items), :class:`Values`, :class:`Maybe` or a set of allowed texts."""
    if isinstance(shape, Maybe):
        return None if value is None else shape_problem(value, shape.shape, where)
    if isinstance(shape, (set, frozenset)):
        return None if isinstance(value, str) and value in shape else \
            f"{where} is {value!r}, not one of {sorted(shape)}"
    expected = dict if isinstance(shape, (dict, Values)) else list if isinstance(shape, list) else shape
    types = expected if isinstance(expected, tuple) else (expected,)
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        names = ["a number" if t is float and int in types else _TYPE_NAMES.get(t, t.__name__)
                 for t in types if not (t is int and float in types)]
        return f"{where} is {_kind(value)}, not {' or '.join(names)}"
    if isinstance(shape, Values):
        return _first(shape_problem(item, shape.shape, _at(where, key)) for key, item in value.items())
    if isinstance(shape, list):
        return _first(shape_problem(item, shape[0], f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(shape, dict):
        for key, inner in shape.items():
            name = key.rstrip("?")
            if name not in value and not key.endswith("?"):
                return f"{where} lacks {name!r}"
            problem = shape_problem(value[name], inner, _at(where, name)) if name in value else None
            if problem:
                return problem
    return None


def _first(problems) -> str | None:
    return next((problem for problem in problems if problem), None)


def _at(where: str, key: str) -> str:
    return repr(key) if where == "it" else f"{where}[{key!r}]"


_TYPE_NAMES = {int: "an integer", float: "a number", str: "text", dict: "a JSON object", list: "a JSON array",
               bool: "true/false", type(None): "null"}


def _kind(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def read_checked_json(path: str | Path, fix: str, shape=None):
    """The JSON content of ``path``; a file that is not readable as JSON, or whose content lacks ``shape`` (see
    :func:`shape_problem`), is one :class:`AbftLensError` naming the file and ending in ``fix``."""
    path = Path(path)
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AbftLensError(f"{path} is damaged: not readable as JSON ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]}).", fix) from None
    problem = shape_problem(data, shape) if shape is not None else None
    if problem:
        raise AbftLensError(f"{path} is damaged: {problem}.", fix)
    return data


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
