"""The `safety.*` metadata contract (DESIGN.md section 2), shared by convert and runtime.

Torch-free and dependency-free: the runtime imports it to read a model file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

FORMAT_VERSION = 1
PREFIX = "safety."
CLS_TOKEN, SAFE_TOKEN, UNSAFE_TOKEN = "<|safety|>", "<|safe|>", "<|unsafe|>"
SPECIAL_TOKENS = (CLS_TOKEN, SAFE_TOKEN, UNSAFE_TOKEN)
KEYS = ("format_version", "cls_token_id", "safe_token_id", "unsafe_token_id", "threshold",
        "base_model", "trained_with", "metrics")


class MetadataError(ValueError):
    pass


@dataclass(frozen=True)
class SafetyMeta:
    format_version: int
    cls_token_id: int
    safe_token_id: int
    unsafe_token_id: int
    threshold: float
    base_model: str = ""
    trained_with: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def token_ids(self) -> tuple[int, int, int]:
        return (self.cls_token_id, self.safe_token_id, self.unsafe_token_id)

    def to_kv(self) -> dict[str, object]:
        """Key/value pairs to write (ints as ints, the metrics as a JSON string)."""
        return {
            PREFIX + "format_version": self.format_version,
            PREFIX + "cls_token_id": self.cls_token_id,
            PREFIX + "safe_token_id": self.safe_token_id,
            PREFIX + "unsafe_token_id": self.unsafe_token_id,
            PREFIX + "threshold": float(self.threshold),
            PREFIX + "base_model": self.base_model,
            PREFIX + "trained_with": self.trained_with,
            PREFIX + "metrics": json.dumps(self.metrics, sort_keys=True),
        }

    @classmethod
    def from_kv(cls, kv: dict[str, str], n_vocab: int, where: str = "model") -> "SafetyMeta":
        """Parse from string-valued metadata (as llama.cpp returns it); raise MetadataError."""
        missing = [k for k in KEYS[:5] if PREFIX + k not in kv]
        if missing:
            raise MetadataError(f"{where} has no safety metadata (missing {', '.join(PREFIX + k for k in missing)}): "
                                "it is not a safe model")
        try:
            version = int(kv[PREFIX + "format_version"])
            ids = [int(kv[PREFIX + k]) for k in ("cls_token_id", "safe_token_id", "unsafe_token_id")]
            threshold = float(kv[PREFIX + "threshold"])
            metrics = json.loads(kv.get(PREFIX + "metrics") or "{}")
        except (ValueError, TypeError) as e:
            raise MetadataError(f"{where} has malformed safety metadata: {e}") from None
        if version > FORMAT_VERSION:
            raise MetadataError(f"{where} uses safety format {version}; this runtime reads up to {FORMAT_VERSION}")
        if len(set(ids)) != 3 or not all(0 <= i < n_vocab for i in ids):
            raise MetadataError(f"{where} has invalid safety token ids {ids} for a vocabulary of {n_vocab}")
        if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
            raise MetadataError(f"{where} has an invalid safety threshold {threshold}")
        return cls(version, *ids, threshold, kv.get(PREFIX + "base_model", ""),
                   kv.get(PREFIX + "trained_with", ""), metrics)
