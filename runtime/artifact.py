"""The safety artifact: the learned [CLS] input row, the two head rows, and its card.

On disk: `<name>.safety.safetensors` (tensors `cls_embedding` (D,), or (K, D) for K chained
side tokens whose last is the [CLS], and `head` (2, D) with rows [benign, malicious]) beside `card.json` (data, recipe, metrics, calibrated threshold);
the `joint` recipe adds `deltas.safetensors` (weight deltas, declared with their sha256 in the
card, so `digest()` covers them), which `convert_gguf` picks up from `source`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .contract import (MAX_EVERY, parse_window, valid_answer_threshold, valid_every, valid_surprisal_threshold,
                       valid_surprisal_window)

TENSORS = "safety.safetensors"
CARD = "card.json"


class ArtifactError(ValueError):
    pass


@dataclass
class Artifact:
    cls_embedding: np.ndarray  # (D,), or (K, D): K side tokens, the last is the [CLS]
    head: np.ndarray           # (2, D): [benign, malicious]
    card: dict
    source: Path | None = field(default=None, compare=False)  # the directory it was loaded from
    # optional (issue 24): harm-category rows (C, D), one per card["categories"]["names"], and the
    # controversial-tier row (1, D); read at the same [CLS] position as `head`
    category_head: np.ndarray | None = None
    controversial_head: np.ndarray | None = None

    @property
    def categories(self) -> list[str]:
        """The category names, in row order ([] without a category head)."""
        return list(self.card.get("categories", {}).get("names", [])) if self.category_head is not None else []

    @property
    def hidden_size(self) -> int:
        return int(self.cls_embedding.shape[-1])

    @property
    def side_rows(self) -> np.ndarray:
        """(K, D): the input rows decoded at a check, in order; the last is the [CLS]."""
        return self.cls_embedding.reshape(-1, self.hidden_size)

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    @property
    def answer_threshold(self) -> float | None:
        """The threshold for the checks inside the answer, when the card calibrated one."""
        a = self.card.get("answer_threshold")
        return None if a is None else float(a)

    @property
    def every(self) -> int | None:
        """The cadence (a check every k generated tokens) the card's thresholds were calibrated at, if recorded."""
        k = self.card.get("every")
        return None if k is None else int(k)

    @property
    def surprisal_threshold(self) -> float | None:
        """The prompt surprisal rule's threshold in nats (runtime/surprisal.py), when the card calibrated one."""
        t = self.card.get("surprisal_threshold")
        return None if t is None else float(t)

    @property
    def surprisal_window(self) -> int | None:
        w = self.card.get("surprisal_window")
        return None if w is None else int(w)

    @property
    def window(self) -> tuple[int, int, int] | None:
        """The windows (r1, r2, r3) the checks inside the answer were trained with (runtime/window.py), if any."""
        w = self.card.get("window")
        return None if w is None else parse_window(w)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.cls_embedding, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.head, np.float32).tobytes())
        for extra in (self.category_head, self.controversial_head):  # absent: the digest is what it was
            if extra is not None:
                h.update(np.ascontiguousarray(extra, np.float32).tobytes())
        h.update(json.dumps(self.card, sort_keys=True).encode())
        return h.hexdigest()

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"cls_embedding": self.cls_embedding.astype(np.float32), "head": self.head.astype(np.float32)}
        if self.category_head is not None:
            tensors["category_head"] = self.category_head.astype(np.float32)
            tensors["controversial_head"] = self.controversial_head.astype(np.float32)
        save_file(tensors, str(d / TENSORS))
        (d / CARD).write_text(json.dumps(self.card, indent=2, sort_keys=True) + "\n")
        return d


def load_artifact(directory: str | Path) -> Artifact:
    d = Path(directory)
    if not (d / TENSORS).is_file() or not (d / CARD).is_file():
        raise ArtifactError(f"{d} is not a safety artifact (needs {TENSORS} and {CARD})")
    try:
        t = load_file(str(d / TENSORS))
        card = json.loads((d / CARD).read_text())
    except Exception as e:  # corrupt file: say which
        raise ArtifactError(f"{d}: cannot read the artifact: {e}") from None
    cls_row, head = t.get("cls_embedding"), t.get("head")
    if (cls_row is None or head is None or cls_row.ndim not in (1, 2) or 0 in cls_row.shape
            or head.shape != (2, cls_row.shape[-1])):
        raise ArtifactError(f"{d}: expected cls_embedding (D,) or (K, D) and head (2, D) tensors")
    if not 0.0 < float(card.get("threshold", -1)) < 1.0:
        raise ArtifactError(f"{d}: card.json has no calibrated threshold in (0, 1)")
    if card.get("answer_threshold") is not None and not valid_answer_threshold(float(card["answer_threshold"])):
        raise ArtifactError(f"{d}: card.json's answer_threshold must be in (0, 1) or inf")
    if card.get("every") is not None and not valid_every(card["every"]):
        raise ArtifactError(f"{d}: card.json's every must be a whole number of tokens, 1..{MAX_EVERY}")
    if card.get("surprisal_threshold") is not None and not valid_surprisal_threshold(card["surprisal_threshold"]):
        raise ArtifactError(f"{d}: card.json's surprisal_threshold must be nats > 0 (or null: off)")
    if card.get("surprisal_window") is not None and not valid_surprisal_window(card["surprisal_window"]):
        raise ArtifactError(f"{d}: card.json's surprisal_window must be a whole number of tokens, 1..{MAX_EVERY}")
    if card.get("window") is not None:
        try:
            parse_window(card["window"])
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{d}: card.json's window: {e}") from None
    if not all(np.isfinite(v).all() for v in t.values()):
        raise ArtifactError(f"{d}: artifact tensors contain NaN or inf")
    cats, tier = t.get("category_head"), t.get("controversial_head")
    if (cats is None) != (tier is None):
        raise ArtifactError(f"{d}: category_head and controversial_head come together")
    if cats is not None:
        names = card.get("categories", {}).get("names")
        D = cls_row.shape[-1]
        if not isinstance(names, list) or cats.shape != (len(names), D) or tier.shape != (1, D):
            raise ArtifactError(f"{d}: category_head must be (C, {D}) for the C names in card.json's categories "
                                f"and controversial_head (1, {D})")
        cats, tier = cats.astype(np.float32), tier.astype(np.float32)
    return Artifact(cls_row.astype(np.float32), head.astype(np.float32), card, source=d,
                    category_head=cats, controversial_head=tier)
