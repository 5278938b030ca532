"""Output paths, checked before any work starts and written so that a failure leaves nothing behind.

Every command that writes (compress, apply, eval --json, bench --out) asks `check_output` first: the
path is not the wrong kind of thing, the nearest folder that exists is a folder this process may
write in, every missing name fits the file system, and the disk has room for the estimated output.
Then it writes through `staged_folder` / `staged_file`: everything goes into a hidden temporary
sibling that is renamed into place only when complete (a folder flushed to disk first, and an
existing one replaced so that a crash loses nothing: heapr_serve.folder_swap), missing parent folders
are created only at that moment, and any OS error on the way becomes one line naming the path (a
HeaprError), with the temporary copy removed.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from heapr_serve.errors import HeaprError
from heapr_serve.folder_swap import flush_to_disk, put_in_place, recover, staging_name, swap_in

GIB = 1024**3


def _exists(path: Path) -> bool:
    """lexists that answers False instead of raising for names too long or paths through a file."""
    try:
        os.lstat(path)
        return True
    except (OSError, ValueError):
        return False


def nearest_existing(path: Path) -> Path:
    """The deepest ancestor of `path` (or `path` itself) that exists."""
    path = Path(os.path.abspath(path))
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


def check_path_text(flag: str, path: Path, kind: str = "folder") -> None:
    """Refuse an empty path or one with a NUL byte (which no OS call accepts)."""
    text = str(path)
    if not text.strip() or "\x00" in text:
        raise HeaprError(f"{flag} {text!r}: not a usable path; give a {kind} path")


def check_output(flag: str, path: Path, *, kind: str = "folder", overwrite: bool = False, merge: bool = False,
                 need_bytes: int = 0) -> None:
    """Refuse, in one line naming `flag`, an output path that could not be written. `kind` is
    "folder" or "file"; an existing folder is refused unless `overwrite` (it will be replaced) or
    `merge` (files are added to it); an existing file is replaced."""
    check_path_text(flag, path, kind)
    if kind == "folder":
        recover(flag, path)  # what a run killed while it replaced this folder left behind
    if _exists(path):
        if kind == "folder" and not path.is_dir():
            raise HeaprError(f"{flag} {path}: exists and is not a folder; choose another path")
        if kind == "file" and path.is_dir():
            raise HeaprError(f"{flag} {path}: is a folder; give a file path")
        if kind == "folder" and not (overwrite or merge):
            raise HeaprError(f"{flag} {path}: already exists; pass --overwrite to replace it or choose another path")
    base = nearest_existing(path)
    if not base.is_dir():
        raise HeaprError(f"{flag} {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise HeaprError(f"{flag} {path}: cannot write in {base} (permission denied); choose a folder you can write to")
    missing = Path(os.path.abspath(path)).relative_to(base).parts
    try:
        name_max = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for name in missing:
        # the staging name (".NAME.heapr-tmp-PID") is what gets created first, so it must fit too
        if len(f".{name}.heapr-tmp-{os.getpid()}".encode()) > name_max:
            raise HeaprError(f"{flag} {path}: the name {name[:40]!r}... is too long for the file system ({name_max} bytes); choose a shorter path")
    if need_bytes:
        free = shutil.disk_usage(base).free
        if need_bytes > free:
            raise HeaprError(f"{flag} {path}: needs ~{need_bytes / GIB:.2f} GiB of disk, {base} has {free / GIB:.2f} GiB free; "
                             "free some space or choose another disk")


def _write_error(flag: str, path: Path, err: OSError) -> HeaprError:
    where = f" ({err.filename})" if err.filename else ""
    return HeaprError(f"{flag} {path}: could not write: {err.strerror or err}{where}; nothing was left behind, "
                      "free some space or choose another path")


@contextmanager
def write_errors(flag: str, path: Path):
    """Turn any OS error in the block into one line naming `flag` and `path`."""
    try:
        yield
    except OSError as err:
        raise _write_error(flag, path, err) from None


@contextmanager
def staged_folder(flag: str, out: Path, *, overwrite: bool = False, merge: bool = False):
    """Yield a hidden temporary folder beside `out` (in the deepest folder that exists); on success
    it becomes `out`: replacing it (`overwrite`), adding its files to it (`merge`), or refusing if
    `out` appeared meanwhile. On any failure the temporary folder is removed and nothing else was
    created; OS errors become one line naming `flag` and `out`."""
    out = Path(out)
    base = nearest_existing(out.parent)
    tmp = base / staging_name(out)
    try:
        if _exists(tmp):
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as err:
        raise _write_error(flag, out, err) from None
    try:
        yield tmp
        _move_into_place(flag, tmp, out, overwrite, merge)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(flag, out, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(flag: str, tmp: Path, out: Path, overwrite: bool, merge: bool) -> None:
    flush_to_disk(tmp)
    if _exists(out) and merge and out.is_dir():
        for item in sorted(tmp.iterdir()):
            target = out / item.name
            if target.is_dir() and not item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
        return
    if _exists(out):
        if not overwrite:
            raise HeaprError(f"{flag} {out}: appeared while this command ran; pass --overwrite to replace it")
        swap_in(flag, tmp, out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    put_in_place(tmp, out)


@contextmanager
def staged_file(flag: str, path: Path):
    """Yield a temporary file path beside `path`, renamed onto `path` when the block succeeds."""
    path = Path(path)
    base = nearest_existing(path.parent)
    tmp = base / f".{path.name}.heapr-tmp-{os.getpid()}"
    try:
        yield tmp
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise _write_error(flag, path, err) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
