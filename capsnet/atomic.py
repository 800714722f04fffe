"""Safe file writing: a file is replaced whole or not at all.

Every writer of this project (weights, models, backups, logs, pictures, `class_names.json`) writes a
temporary file beside its target and renames it into place, so a crash, a Ctrl-C or a full disk never
leaves a truncated file where a good one was. NumPy-free and Keras-free, so that any module can use it.

Usage::

    from capsnet.atomic import atomic_path, write_text_atomic

    with atomic_path("result/log.png") as tmp:
        figure.savefig(tmp, format="png")
    write_text_atomic("result/class_names.json", text)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds.

    A crash or an exception while writing never leaves a truncated file where a good one was.
    The temporary name keeps the suffix (`.weights.h5`, `.keras`, `.png`) that writers check.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem.split('.')[0]}-", suffix="".join(path.suffixes),
                               dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers such as h5py refuse to overwrite some existing files
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename:
            raise
        # Some writers (h5py) raise without a file name, the errno only inside the message: name the
        # file the user asked for, so that the CLI's one line says which file failed and why.
        found = re.search(r"errno = (\d+)", str(e))
        code = e.errno or (int(found.group(1)) if found else 0)
        raise OSError(code, os.strerror(code) if code else str(e).splitlines()[0], str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_free_space(path: str | os.PathLike, needed_bytes: int) -> None:
    """Raises `OSError(ENOSPC)` naming `path` when its folder has less than `needed_bytes` free.

    Checked before writers that crash rather than fail on a full disk: h5py was seen to die with a
    segmentation fault when the disk filled in the middle of `save_weights`.
    """
    free = shutil.disk_usage(Path(path).parent).free
    if free < needed_bytes:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free, "
                                    f"about {needed_bytes} needed)", str(path))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
