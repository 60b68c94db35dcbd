"""Small file helpers shared by the converter's atomic writers."""
from __future__ import annotations

import os
from pathlib import Path


def set_default_mode(path: str | Path) -> None:
    """mkstemp creates 0600 files; give a finished file the usual 0666 & ~umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
