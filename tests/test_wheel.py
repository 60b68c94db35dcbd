"""One distribution, its own names (issue 36): the built wheel installs the import names `runtime` and
`safechat` and nothing generic beside them (no top-level `train`, `bench` or `convert`).

The wheel is built from a copy of the checkout (no build/ left behind), installed with --no-deps into a fresh
venv (no system site-packages: only what the wheel brings lands there), and its top-level names are read
three ways: the installed dist's RECORD, its top_level.txt, and the venv's site-packages before and after.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"runtime", "safechat"}
ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _top(paths) -> set[str]:
    """Top-level import names among site-packages paths ('a/b.py', 'a.dist-info/RECORD', '../../bin/x')."""
    tops = {p.replace("\\", "/").split("/")[0] for p in paths if p and not p.startswith("..")}
    return {t for t in tops if not t.endswith((".dist-info", ".egg-info")) and t != "__pycache__"}


@pytest.mark.downloads
@pytest.mark.timeout(900)
def test_the_wheel_installs_only_runtime_and_safechat(tmp_path):
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "out", "__pycache__",
                                                             "*.egg-info", "*.so", ".carry", ".gpu"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(dist), str(src)], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("safechat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert _top(names) == NAMES, sorted(_top(names))
    # the moved packages and their data are inside safechat; the native module (setup.py: runtime._native),
    # where a compiler exists, inside runtime
    for name in ("safechat/cli.py", "safechat/train/__main__.py", "safechat/bench/__main__.py",
                 "safechat/convert/__main__.py", "safechat/convert/verify_prompts_v2.json", "runtime/__init__.py"):
        assert name in names, name
    assert all(n.startswith("runtime/") for n in names if "_native" in n)

    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    where = subprocess.run([str(py), "-c", "import sysconfig; p = sysconfig.get_paths(); "
                            "print(p['purelib']); print(p['platlib'])"],
                           capture_output=True, text=True, env=ENV, timeout=60).stdout.split("\n")
    sites = {Path(p) for p in where if p.strip()}
    before = {e.name for s in sites if s.is_dir() for e in s.iterdir()}
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    after = {e.name for s in sites if s.is_dir() for e in s.iterdir()}
    assert _top(after - before) == NAMES, sorted(after - before)
    (info,) = [s / n for s in sites for n in after - before if n.startswith("safechat-") and n.endswith(".dist-info")]
    record = [line.split(",")[0] for line in (info / "RECORD").read_text().splitlines()]
    assert _top(record) == NAMES, sorted(_top(record))
    if (info / "top_level.txt").is_file():  # setuptools writes it; the names it lists are what a user imports
        assert set((info / "top_level.txt").read_text().split()) == NAMES
    assert (info / "entry_points.txt").read_text().count("safechat = safechat.cli:main") == 1
    # and the generic names are not importable from the fresh venv (it has no site-packages of the system)
    r = subprocess.run([str(py), "-c", "import importlib.util as u; "
                        "print([n for n in ('train', 'bench', 'convert') if u.find_spec(n)])"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
