"""The `safety.*` metadata contract (docs/design.md section 2), shared by the runtime, convert and train.

Torch-free and dependency-free: the runtime imports it to read a model file.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

FORMAT_VERSION = 2  # the highest this code reads; a file is written as 1 unless it has side tokens
PREFIX = "safety."
CLS_TOKEN, SAFE_TOKEN, UNSAFE_TOKEN = "<|safety|>", "<|safe|>", "<|unsafe|>"
SPECIAL_TOKENS = (CLS_TOKEN, SAFE_TOKEN, UNSAFE_TOKEN)
# optional (format 2): the ids of K-1 learned side tokens decoded, in order, right before the [CLS]
# at every check (a soft prompt; nothing real attends to them either); a JSON list as a string
SIDE_TOKEN_IDS = "side_token_ids"
MAX_CHECK_TOKENS = 16  # side tokens + [CLS] (cpp_ext/loop.h MAX_SIDE)


def side_token_name(i: int) -> str:
    return f"<|safety_side_{i}|>"


# optional (issue 24): a harm-category head read at the same [CLS] position. The names (JSON list, row
# order; the last is usually "none"), their token ids, per-category thresholds (JSON lists), and the
# controversial-tier token and threshold. A file without them loads and behaves as before; a runtime
# that does not know them ignores them (the tokens are ordinary control tokens).
CATEGORIES, CATEGORY_TOKEN_IDS, CATEGORY_THRESHOLDS = "categories", "category_token_ids", "category_thresholds"
CONTROVERSIAL_TOKEN_ID, CONTROVERSIAL_THRESHOLD = "controversial_token_id", "controversial_threshold"
CONTROVERSIAL_TOKEN = "<|safety_controversial|>"


def category_token_name(name: str) -> str:
    return f"<|safety_cat_{name}|>"
KEYS = ("format_version", "cls_token_id", "safe_token_id", "unsafe_token_id", "threshold",
        "base_model", "trained_with", "metrics")
# optional: the threshold for the checks after the prompt (inside the answer); absent = `threshold`,
# inf = no checks inside the answer (none could act)
ANSWER_THRESHOLD = "answer_threshold"
# optional: the cadence the thresholds were calibrated at, a check every k generated tokens; absent = the
# runtime's default (DEFAULT_EVERY). A policy's own `every` overrides it.
EVERY = "every"
DEFAULT_EVERY = 4  # the cadence of a file that does not carry its own (files calibrated before `safety.every`)
# optional (issue 35): the prompt surprisal rule (runtime/surprisal.py), refuse a prompt whose user text's
# evidence reaches `surprisal_threshold` (nats; absent = off), over windows of `surprisal_window` tokens
# (absent = surprisal.DEFAULT_WINDOW)
SURPRISAL_THRESHOLD, SURPRISAL_WINDOW = "surprisal_threshold", "surprisal_window"
DEFAULT_SURPRISAL_WINDOW = 8  # tokens (issue 35's measurement used 8)
# optional (issue 35): windowed strategic attention inside the answer (runtime/window.py), "r1,r2,r3" as text;
# absent = a check inside the answer sees everything before it
WINDOW = "window"


def stored_threshold(x: float) -> float:
    """The threshold to write: the smallest float32 >= x rounded up to 6 decimals.

    The file stores float32 and llama.cpp hands metadata to the runtime as text with 6 decimals.
    A calibrated threshold sits one float64 step above the highest score it must let through;
    rounding it to the nearest value would, about half the time, land below that score and refuse
    the very conversation calibration counted as allowed (v9's 0.9781200955 read back as 0.978120).
    """
    if not math.isfinite(x):
        return x
    q = math.floor(x * 1e6) / 1e6
    if q < x:
        q = round(q + 1e-6, 6)
    f = struct.unpack("<f", struct.pack("<f", q))[0]
    if f < q:  # the next float32 up: its 6-decimal text is still q
        bits = struct.unpack("<i", struct.pack("<f", f))[0]
        f = struct.unpack("<f", struct.pack("<i", bits + 1 if f >= 0 else bits - 1))[0]
    return f


def valid_answer_threshold(a: float) -> bool:
    return 0.0 < a < 1.0 or a == math.inf


MAX_EVERY = 4096


def valid_every(k) -> bool:
    """A file's calibrated cadence: a whole number of tokens between checks inside the answer."""
    return isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_EVERY


def valid_surprisal_threshold(t) -> bool:
    """Nats, finite and > 0, or inf (the rule off)."""
    return isinstance(t, (int, float)) and not isinstance(t, bool) and (t == math.inf or 0.0 < t < math.inf)


def valid_surprisal_window(w) -> bool:
    return valid_every(w)


def valid_window(w) -> bool:
    """(r1, r2, r3) tokens: r1 >= 0 (after a flagged query), r2 >= 1 (after a cleared one), r3 >= 0 (after a flip)."""
    ok = isinstance(w, tuple) and len(w) == 3 and all(isinstance(r, int) and not isinstance(r, bool) for r in w)
    return ok and 0 <= w[0] <= MAX_EVERY and 1 <= w[1] <= MAX_EVERY and 0 <= w[2] <= MAX_EVERY


def window_text(w: tuple[int, int, int]) -> str:
    return ",".join(str(int(r)) for r in w)


def parse_window(text) -> tuple[int, int, int]:
    """(r1, r2, r3) from "R1,R2,R3" (or a list of three ints, as a card holds it); ValueError otherwise."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        w = tuple(int(str(r).strip()) for r in parts)
    except ValueError:
        raise ValueError(f"a window is three whole numbers R1,R2,R3, got {text!r}") from None
    if not valid_window(w):
        raise ValueError(f"a window is R1,R2,R3 tokens with R1 >= 0, R2 >= 1, R3 >= 0 (at most {MAX_EVERY}), "
                         f"got {text!r}")
    return w


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
    answer_threshold: float | None = None
    side_token_ids: tuple[int, ...] = ()
    categories: tuple[str, ...] = ()
    category_token_ids: tuple[int, ...] = ()
    category_thresholds: tuple[float, ...] = ()
    controversial_token_id: int | None = None
    controversial_threshold: float | None = None
    every: int | None = None
    surprisal_threshold: float | None = None  # None: no surprisal rule in this file
    surprisal_window: int | None = None       # None: surprisal.DEFAULT_WINDOW
    window: tuple[int, int, int] | None = None  # None: a check inside the answer sees everything

    @property
    def token_ids(self) -> tuple[int, ...]:
        """(*side, cls, safe, unsafe): a check decodes all but the last two; none is ever sampled or typed."""
        return (*self.side_token_ids, self.cls_token_id, self.safe_token_id, self.unsafe_token_id)

    @property
    def category_ids(self) -> tuple[int, ...]:
        """(*categories, controversial): the rows a check reads beside the label pair; () without a category
        head. Never sampled or typed either."""
        return (*self.category_token_ids, self.controversial_token_id) if self.categories else ()

    def to_kv(self) -> dict[str, object]:
        """Key/value pairs to write (ints as ints, the metrics as a JSON string)."""
        return {
            PREFIX + "format_version": self.format_version,
            PREFIX + "cls_token_id": self.cls_token_id,
            PREFIX + "safe_token_id": self.safe_token_id,
            PREFIX + "unsafe_token_id": self.unsafe_token_id,
            PREFIX + "threshold": stored_threshold(self.threshold),
            PREFIX + "base_model": self.base_model,
            PREFIX + "trained_with": self.trained_with,
            PREFIX + "metrics": json.dumps(self.metrics, sort_keys=True),
        } | ({} if self.answer_threshold is None else {PREFIX + ANSWER_THRESHOLD: stored_threshold(self.answer_threshold)}) \
          | ({PREFIX + SIDE_TOKEN_IDS: json.dumps(list(self.side_token_ids))} if self.side_token_ids else {}) \
          | (self._category_kv() if self.categories else {}) \
          | ({} if self.every is None else {PREFIX + EVERY: int(self.every)}) \
          | ({} if self.surprisal_threshold is None
             else {PREFIX + SURPRISAL_THRESHOLD: stored_threshold(self.surprisal_threshold)}) \
          | ({} if self.surprisal_window is None else {PREFIX + SURPRISAL_WINDOW: int(self.surprisal_window)}) \
          | ({} if self.window is None else {PREFIX + WINDOW: window_text(self.window)})

    def _category_kv(self) -> dict[str, object]:
        return {PREFIX + CATEGORIES: json.dumps(list(self.categories)),
                PREFIX + CATEGORY_TOKEN_IDS: json.dumps(list(self.category_token_ids)),
                PREFIX + CATEGORY_THRESHOLDS: json.dumps([float(t) for t in self.category_thresholds]),
                PREFIX + CONTROVERSIAL_TOKEN_ID: int(self.controversial_token_id),
                PREFIX + CONTROVERSIAL_THRESHOLD: float(self.controversial_threshold)}

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
            answer = kv.get(PREFIX + ANSWER_THRESHOLD)
            answer = None if answer is None else float(answer)
            cadence = kv.get(PREFIX + EVERY)
            cadence = None if cadence is None else int(cadence)
            side = tuple(int(i) for i in json.loads(kv.get(PREFIX + SIDE_TOKEN_IDS) or "[]"))
            s_thr, s_win = kv.get(PREFIX + SURPRISAL_THRESHOLD), kv.get(PREFIX + SURPRISAL_WINDOW)
            s_thr = None if s_thr is None else float(s_thr)
            s_win = None if s_win is None else int(s_win)
            cats = _categories_from_kv(kv)
            window = kv.get(PREFIX + WINDOW)
            window = None if window is None else parse_window(window)
        except (ValueError, TypeError, KeyError) as e:
            raise MetadataError(f"{where} has malformed safety metadata: {e}") from None
        if version > FORMAT_VERSION:
            raise MetadataError(f"{where} uses safety format {version}; this runtime reads up to {FORMAT_VERSION}")
        if len(side) + 1 > MAX_CHECK_TOKENS:
            raise MetadataError(f"{where} lists {len(side)} side tokens; at most {MAX_CHECK_TOKENS - 1} are supported")
        if side and version < 2:
            raise MetadataError(f"{where} lists side tokens but declares safety format {version} (side tokens need 2)")
        ids = [*side, *ids]
        if len(set(ids)) != len(ids) or not all(0 <= i < n_vocab for i in ids):
            raise MetadataError(f"{where} has invalid safety token ids {ids} for a vocabulary of {n_vocab}")
        if cats:
            names, cat_ids, cat_thr, tier_id, tier_thr = cats
            every = ids + list(cat_ids) + [tier_id]
            if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                raise MetadataError(f"{where} has malformed safety categories {names!r}")
            if len(cat_ids) != len(names) or len(cat_thr) != len(names):
                raise MetadataError(f"{where} lists {len(names)} categories but {len(cat_ids)} token ids and "
                                    f"{len(cat_thr)} thresholds")
            if len(set(every)) != len(every) or not all(0 <= i < n_vocab for i in every):
                raise MetadataError(f"{where} has invalid category token ids for a vocabulary of {n_vocab}")
            if not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in (*cat_thr, tier_thr)):
                raise MetadataError(f"{where} has category thresholds outside [0, 1]")
        if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
            raise MetadataError(f"{where} has an invalid safety threshold {threshold}")
        if answer is not None and not valid_answer_threshold(answer):
            raise MetadataError(f"{where} has an invalid answer threshold {answer} (needs (0, 1) or inf)")
        if cadence is not None and not valid_every(cadence):
            raise MetadataError(f"{where} has an invalid check cadence {cadence} (needs an integer 1..{MAX_EVERY})")
        if s_thr is not None and not valid_surprisal_threshold(s_thr):
            raise MetadataError(f"{where} has an invalid surprisal threshold {s_thr} (needs nats > 0, or inf)")
        if s_win is not None and not valid_surprisal_window(s_win):
            raise MetadataError(f"{where} has an invalid surprisal window {s_win} (needs an integer 1..{MAX_EVERY})")
        return cls(version, *ids[len(side):], threshold, kv.get(PREFIX + "base_model", ""),
                   kv.get(PREFIX + "trained_with", ""), metrics, answer, side, *(cats or ()), every=cadence,
                   surprisal_threshold=s_thr, surprisal_window=s_win, window=window)


def _categories_from_kv(kv: dict[str, str]):
    """(names, token ids, thresholds, controversial id, controversial threshold), or None when absent."""
    if PREFIX + CATEGORIES not in kv:
        return None
    names = tuple(json.loads(kv[PREFIX + CATEGORIES]))
    ids = tuple(int(i) for i in json.loads(kv.get(PREFIX + CATEGORY_TOKEN_IDS) or "[]"))
    thr = tuple(float(t) for t in json.loads(kv.get(PREFIX + CATEGORY_THRESHOLDS) or "[]"))
    return names, ids, thr, int(kv[PREFIX + CONTROVERSIAL_TOKEN_ID]), float(kv[PREFIX + CONTROVERSIAL_THRESHOLD])


# -- the verification stamp (written by `convert quantize` / `convert verify --record`) ---------------
# safety.verified: "pass" or "fail"; safety.verification: JSON with the prompt set, the reference and
# the figures. A file without the stamp is *unverified*: it loads (a converted file keeps its base's
# weights, which the artifact's own metrics were measured on); a file stamped "fail" is refused.
VERIFIED, VERIFICATION = PREFIX + "verified", PREFIX + "verification"
STAMP_KEYS = (VERIFIED, VERIFICATION)
OVERRIDE_HINT = "load it with runtime.load(..., allow_unverified=True) to run it anyway"


def verification_problem(kv: dict[str, str], where: str = "model") -> str | None:
    """Why the file must not be called safe (its stamp says it failed, is unreadable, or was measured at
    other thresholds or another cadence than the file now carries), else None."""
    status = kv.get(VERIFIED)
    if status is None:
        return None
    try:
        rec = json.loads(kv.get(VERIFICATION) or "{}")
    except ValueError:
        rec = {}
    if not isinstance(rec, dict):
        rec = {}
    if status == "pass":
        edits = stamp_mismatches(kv, rec)
        return None if not edits else (
            f"{where} was edited after its safety verification: {'; '.join(edits)}. Its stamp "
            f"({VERIFIED}=pass) vouches for the values it was measured at, not for these: verify the file again "
            f"(`safechat verify FILE --record`), or {OVERRIDE_HINT}")
    if status != "fail":
        return f"{where} has an unrecognised verification status {status!r}; {OVERRIDE_HINT}"
    bar = rec.get("bar", {})
    figures = []
    for name, label, op, fmt in (("verdict_agreement", "verdict agreement", ">=", ".3f"),
                                 ("mean_abs_dp", "mean |delta p_unsafe|", "<=", ".4f")):
        if name in rec:
            limit = bar.get(name)
            miss = limit is not None and (rec[name] < limit if op == ">=" else rec[name] > limit)
            figures.append(f"{label} {rec[name]:{fmt}}" + (f" (bar {op} {limit:g}: FAILED)" if miss else ""))
    against = f" against {rec['reference']}" if rec.get("reference") else ""
    prompts = f" on {rec['prompt_set']}" if rec.get("prompt_set") else ""
    return (f"{where} failed safety verification{against}{prompts}: {', '.join(figures) or 'no figures recorded'}; "
            f"its safety verdicts differ from the reference model's beyond the bar. Re-quantize to a higher "
            f"precision, or {OVERRIDE_HINT}")


# thresholds travel as text with 6 decimals (llama.cpp's metadata): a smaller difference is no edit
STAMP_TOLERANCE = 5e-7


def _number(text) -> float | None:
    """A metadata value as a float (None: absent; NaN: unreadable, which matches nothing)."""
    if text is None:
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _same(stamped, value: float | None) -> bool:
    if value is None or not isinstance(stamped, (int, float)):
        return False
    return stamped == value or abs(stamped - value) <= STAMP_TOLERANCE


def stamp_mismatches(kv: dict[str, str], rec: dict) -> list[str]:
    """The `safety.*` values the file carries that differ from those its stamp `rec` was measured at, one
    "safety.KEY is X in the file, Y in its stamp" each. A verdict agreement measured at one threshold says nothing about another: a file
    edited after verification (by hand, gguf-set-metadata, another tool) must not pass as verified.

    Only what the stamp recorded is compared: `threshold` always; `answer_threshold` (recorded when the
    checks inside the answer were compared, else absent) against the file's, or its `threshold` when it
    has none; `every` (recorded since the stamp carries the cadence: 0 when no check inside the answer
    could act) against the file's, or DEFAULT_EVERY. An older stamp without `every` leaves the cadence, and
    an answer threshold it did not record, unchecked."""
    out = []
    threshold = _number(kv.get(PREFIX + "threshold"))
    if "threshold" in rec and not _same(rec["threshold"], threshold):
        out.append(f"{PREFIX}threshold is {threshold} in the file, {rec['threshold']} in its stamp")
    answer = _number(kv.get(PREFIX + ANSWER_THRESHOLD))
    effective = threshold if answer is None else answer
    stamped = rec.get("answer_threshold")
    if stamped is None and rec.get("every") == 0:
        stamped = math.inf  # verified with no check inside the answer: none may act now either
    if stamped is not None and not _same(stamped, effective):
        value = f"{answer}" if answer is not None else f"absent (so {PREFIX}threshold, {threshold})"
        out.append(f"{PREFIX}{ANSWER_THRESHOLD} is {value} in the file, {stamped} in its stamp")
    if SURPRISAL_THRESHOLD in rec:  # stamps since issue 35 record the surprisal rule (None: off)
        text = kv.get(PREFIX + SURPRISAL_THRESHOLD)
        value = _number(text)
        stamped = rec[SURPRISAL_THRESHOLD]
        off = value is None or value == math.inf
        if (stamped is None) != off or (stamped is not None and not off and not _same(stamped, value)):
            out.append(f"{PREFIX}{SURPRISAL_THRESHOLD} is {text if text is not None else 'absent (off)'} in the "
                       f"file, {stamped if stamped is not None else 'off'} in its stamp")
        text = kv.get(PREFIX + SURPRISAL_WINDOW)
        window = _number(text) if text is not None else DEFAULT_SURPRISAL_WINDOW
        if stamped is not None and not _same(rec.get(SURPRISAL_WINDOW), window):
            value = text if text is not None else f"absent (so the default, {DEFAULT_SURPRISAL_WINDOW})"
            out.append(f"{PREFIX}{SURPRISAL_WINDOW} is {value} in the file, {rec.get(SURPRISAL_WINDOW)} in its stamp")
    if WINDOW in rec:  # stamps since the window record it (None: the checks saw everything)
        text = kv.get(PREFIX + WINDOW)
        try:
            window = None if text is None else parse_window(text)
        except ValueError:
            window = "unreadable"
        stamped = rec[WINDOW]
        stamped = None if stamped is None else tuple(stamped)
        if window != stamped:
            out.append(f"{PREFIX}{WINDOW} is {text if text is not None else 'absent (sees everything)'} in the file, "
                       f"{window_text(stamped) if stamped is not None else 'absent'} in its stamp")
    if rec.get("every"):  # the checks inside the answer were compared at this cadence
        text = kv.get(PREFIX + EVERY)
        every = _number(text) if text is not None else DEFAULT_EVERY
        if not _same(rec["every"], every):
            value = text if text is not None else f"absent (so the default, {DEFAULT_EVERY})"
            out.append(f"{PREFIX}{EVERY} is {value} in the file, {rec['every']} in its stamp")
    return out
