"""Files on disk: atomic writes (a result is either complete or not there at all), checked JSON reads, output
paths and folders checked before any computation runs, and file-system errors as one message."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from abft_lens.errors import AbftLensError

NUMBER = (int, float)
FILE_SYSTEM_FIX = "check the path, its permissions and the free space on its disk, then run the command again."


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``. A failure
    (a full disk, a folder turned read-only) removes the temporary file and raises an ``OSError`` naming ``path``."""
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
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(error, path)
    return path


def _naming(error: BaseException, path: Path) -> BaseException:
    """An OS error about ``path`` (a failed write or fsync names no file; a failed rename names the temporary one)."""
    if isinstance(error, OSError) and error.errno is not None:
        named = OSError(error.errno, error.strerror, str(path))
        named.__cause__ = error
        return named
    return error


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a log that survives a crash up to its last line; a crash
    mid-line leaves a last line without its newline, which the readers drop)."""
    try:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise _naming(error, Path(path)) from error


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


# -------------------------------------------------------------------------------- outputs, folders, errors


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """Refuse an output path that cannot become a file (an existing folder, a path under a file, a symbolic-link
    loop, a folder this process may not write) before any computation runs."""
    path = Path(path)
    if path.is_dir():
        raise AbftLensError(f"{option} {path} is a folder; it must name a file.",
                            f"pass a file name, e.g. {option} {path / 'result.json'}.")
    _check_writable(path, option, path.parent)
    return path


def check_folder(path: str | Path, option: str) -> Path:
    """Refuse a folder to be written (or made) that cannot be: a file, a path under a file, a symbolic-link loop,
    or a folder (the nearest existing one, for a folder still to be made) this process may not write."""
    path = Path(path)
    _check_writable(path, option, path)
    return path


def _check_writable(path: Path, option: str, folder: Path) -> None:
    existing = folder
    while True:
        try:
            os.stat(existing)
            break
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(existing):
                raise AbftLensError(f"{option} {path}: {existing} is a symbolic link to a missing target.",
                                    f"choose another {option}, or remove the link.") from None
        except OSError as error:  # a symbolic-link loop, a folder we may not enter
            raise AbftLensError(f"{option} {path} cannot be used: {existing}: {error.strerror}.",
                                f"choose another {option}.") from None
        if existing == existing.parent:
            return
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise AbftLensError(f"{option} {path} {where}, not a folder.", f"choose another {option}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AbftLensError(f"{option} {path}: the folder {existing} is not writable for this user.",
                            f"choose another {option}, or make {existing} writable.")


def file_system_error(error: OSError) -> AbftLensError:
    """An ``OSError`` no check foresaw (a full disk, a folder made read-only while a command ran) as one message
    naming the path and the system's words. Atomic writes leave every file complete or absent."""
    code = errno.errorcode.get(error.errno or -1)
    where = f" at {error.filename}" if error.filename is not None else ""
    words = error.strerror or str(error) or type(error).__name__
    return AbftLensError(f"file system error{where}: {words}" + (f" ({code})." if code else "."), FILE_SYSTEM_FIX)
