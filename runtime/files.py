"""Small file helpers shared by the converter's writers: one way to write a file atomically."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def set_default_mode(path: str | Path) -> None:
    """mkstemp creates 0600 files; give a finished file the usual 0666 & ~umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def temp_beside(out: str | Path, suffix: str = ".tmp") -> Path:
    """A new empty temp file in `out`'s folder (created, so the name is ours); the caller removes it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=suffix, dir=out.parent)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_output(out: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `out`; when the block ends normally it becomes `out` (mode 0666 & ~umask,
    one rename), otherwise it is removed and `out` is untouched."""
    out = Path(out)
    tmp = temp_beside(out, suffix)
    try:
        yield tmp
        set_default_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
