"""Putting a finished output folder in place so that a crash at any moment loses nothing.

The new folder is written in full beside its destination (heapr_serve.preflight.staged_folder) and
flushed to disk, every file and then every folder, before any rename, so a renamed folder is never
half-written after a power cut. Replacing an existing folder (`--overwrite`) takes two renames: the
old folder steps aside as `.NAME.heapr-replaced`, the new one takes NAME, and only then is the old one
removed. A process killed between the two leaves `.NAME.heapr-replaced` and no NAME: the next command
that writes NAME moves it back before it looks at anything (`recover`), or, if that fails, says in one
line where the old output is and how to put it back. Staging folders whose process died are removed
at the same moment, so an interrupted run leaves no strays.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from heapr_serve.errors import HeaprError
from heapr_serve.progress import console

STAGING_TAG = ".heapr-tmp-"  # `.NAME.heapr-tmp-PID`: a folder being written by process PID


def staging_name(out: Path) -> str:
    return f".{out.name}{STAGING_TAG}{os.getpid()}"


def replaced_folder(out: Path) -> Path:
    """Where the old `out` waits while a new one takes its place."""
    return out.parent / f".{out.name}.heapr-replaced"


def flush_to_disk(folder: Path) -> None:
    """fsync every file under `folder`, then every folder from the deepest up to `folder` itself."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(flag: str, new: Path, out: Path) -> None:
    """Replace the folder `out` by the flushed folder `new`; the old one is removed only once the new
    one is in place, and put back if the new one cannot be."""
    aside = replaced_folder(out)
    set_aside(out, aside)
    try:
        put_in_place(new, out)
    except OSError as err:
        try:
            put_in_place(aside, out)
        except OSError:
            raise HeaprError(f"{flag} {out}: could not put the new output in place ({err.strerror or err}) nor the previous one back; "
                             f"it is in {aside}: restore it with `mv {aside} {out}`") from None
        raise
    shutil.rmtree(aside, ignore_errors=True)


def set_aside(out: Path, aside: Path) -> None:
    os.replace(out, aside)
    _fsync(out.parent)


def put_in_place(new: Path, out: Path) -> None:
    os.replace(new, out)
    _fsync(out.parent)


def recover(flag: str, out: Path) -> None:
    """Finish what an interrupted write of `out` left behind: a previous output set aside goes back
    to `out` (said in one line), or is removed where the new `out` was already in place; staging
    folders of processes that are gone are removed. A HeaprError, with the fix, where it cannot."""
    aside = replaced_folder(out)
    if os.path.lexists(aside):
        if os.path.lexists(out):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                put_in_place(aside, out)
            except OSError as err:
                raise HeaprError(f"{flag} {out}: an interrupted --overwrite left the previous output in {aside} and it could not be "
                                 f"moved back ({err.strerror or err}); restore it with `mv {aside} {out}`, or remove it") from None
            console.print(f"note: {flag} {out}: an interrupted --overwrite had left the previous output in {aside.name}; "
                          "it is back in place", highlight=False, soft_wrap=True)
    prefix = f".{out.name}{STAGING_TAG}"
    try:
        beside = list(out.parent.iterdir())
    except OSError:  # no such folder yet, or not one this process may list: nothing of ours is there
        return
    for stale in beside:
        pid = stale.name[len(prefix):] if stale.name.startswith(prefix) else ""
        if pid.isdigit() and stale.is_dir() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
