"""Durable file operations of the store: staged directories committed by rename, fsyncs, quiet removal."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)


def write_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, flushed to disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir_quietly(path: Path) -> None:
    try:
        fsync_dir(path)
    except OSError:
        logger.warning("could not fsync %s", path, exc_info=True)


def remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        logger.warning("could not remove %s", path, exc_info=True)


def stage_directory(tmp: Path, files: dict[str, bytes]) -> Path:
    """A new directory under `tmp` holding `files` (name -> bytes), every file and the directory fsynced."""
    os.makedirs(tmp, exist_ok=True)
    staged = tmp / uuid.uuid4().hex
    os.mkdir(staged)
    for name, data in files.items():
        write_file(staged / name, data)
    fsync_dir(staged)
    return staged


def replace_directory(staged: Path, final: Path) -> None:
    """Rename `staged` to `final`; an existing `final` is renamed aside to `.<name>.old` first and deleted after
    (start-up finishes an interrupted replacement: `final` present means committed)."""
    parent = final.parent
    aside = None
    if final.exists():
        aside = parent / f".{final.name}.old"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        try:
            os.replace(staged, final)
        except BaseException:
            try:
                os.replace(aside, final)
            except OSError:
                logger.exception("could not roll back %s; start-up will restore it", final)
            raise
    else:
        os.replace(staged, final)
    # committed: what follows is cleanup that start-up would redo
    fsync_dir_quietly(parent)
    if aside is not None:
        remove_quietly(aside)
