"""Writing outputs safely: nothing a user has is overwritten without asking, `--overwrite` removes only what litllm
itself wrote, and nothing is ever left half-written (temp dir, fsync, one rename)."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from litllm.errors import UserError


def check_out_dir(out_dir: Path | str, inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse an output directory that litllm must never fill or clear: a file, /, the home directory, the working
    directory or one of its parents, or a directory that is, holds or lies inside one of the run's `inputs`
    (checkpoints, data)."""
    out_dir = Path(out_dir)
    resolved = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a directory; name a directory for the outputs")
    here = Path.cwd().resolve()
    reserved = {**{parent: "a parent of the current directory" for parent in here.parents},
                Path("/"): "the root directory", Path.home().resolve(): "your home directory",
                here: "the current directory"}
    if resolved in reserved:
        raise UserError(f"--out_dir {out_dir} is {reserved[resolved]}; name a directory of its own for the outputs, "
                        "e.g. out/my-run")
    for source in inputs:
        if source is None:
            continue
        source_resolved = Path(source).resolve()
        relation = ("is" if source_resolved == resolved else "holds" if resolved in source_resolved.parents
                    else "lies inside" if source_resolved in resolved.parents else None)
        if relation:
            raise UserError(f"--out_dir {out_dir} {relation} {source}, an input of this run; name a directory of "
                            "its own for the outputs, e.g. out/my-run")


def refuse_to_overwrite(path: Path | str, overwrite: bool, owned: Callable[[str], bool] | None = None) -> None:
    """Before replacing `path`: a UserError if it holds something (a file, or a directory that is not empty) and
    `overwrite` is off, or, with `overwrite`, if the directory holds entries that `owned` does not recognize as
    what litllm writes there (those are the user's: never deleted)."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite true to replace it")
    if path.is_dir() and owned is not None:
        foreign = sorted(entry.name for entry in path.iterdir() if not owned(entry.name))
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UserError(f"{path} holds what litllm did not write there ({listed}); --overwrite replaces only "
                            "litllm's own outputs: move those away, or pick another output directory")


def remove_entries(directory: Path, names: Iterable[str]) -> None:
    for name in names:
        entry = directory / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


@contextmanager
def atomic_dir(out_dir: Path | str) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir` to fill; on success it replaces `out_dir` in one rename.

    Every file is flushed to disk (fsync) before the rename, and the rename before the old directory goes, so a
    run killed at any moment, or a machine that loses power, leaves either the old complete directory or the new
    one, never half of one. A full disk is a one-line error, and the old directory stays.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        with _disk_full_is_a_user_error(out_dir):
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    _fsync(file)
            _fsync(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
        _fsync(out_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temp file path beside `path` to write; on success it replaces `path` in one rename (after an fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(descriptor)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private (0600)
    try:
        with _disk_full_is_a_user_error(path):
            yield tmp
            _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _disk_full_is_a_user_error(target: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"no space left on the device while writing {target} (nothing was replaced); free some "
                        "space and run the command again") from None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
