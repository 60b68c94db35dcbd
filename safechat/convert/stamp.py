"""The verification stamp: `convert verify`'s outcome, recorded in the model file's own metadata.

`safety.verified` is "pass" only when the file met the bar (verdict agreement and mean |delta
p_unsafe| against the torch reference, `verify.py`); a file that missed it is stamped "fail", with
its figures, and the runtime refuses to load it unless told to (`metadata.verification_problem`).
`safety.verification` (JSON) says against what and on which prompt set. Writing a stamp copies the
file (GGUF: every tensor byte for byte; ONNX: the graph unchanged) with only these keys replaced,
atomically. A stamp stays with the file it was measured on: `convert quantize` replaces it (or drops
a stale one copied from its source) in every file it writes; a forced re-conversion (`fold.py`) and a
merge of weight deltas (`merge.py`) drop it. It records the thresholds and the cadence it was measured
at, and the runtime refuses a file whose `safety.*` values no longer match them.
"""
from __future__ import annotations

import json
from pathlib import Path

from runtime.files import atomic_output
from runtime.gguf_io import architecture, copied_fields, copied_tensors, read_gguf, scalar_kv, write_gguf
from runtime.contract import STAMP_KEYS, VERIFICATION, VERIFIED


def stamp_of(result, prompt_set: dict, bar: dict) -> dict[str, str]:
    """The two metadata values for a `verify.ModelResult` on `prompt_set` (the loaded JSON).

    The record names the thresholds and the cadence the figures were measured at (`every`: tokens between
    the checks inside the answer, 0 when none could act): the runtime refuses a "pass" whose file now
    carries other values (`runtime.contract.stamp_mismatches`)."""
    rec = {"prompt_set": f"{prompt_set.get('name')} v{prompt_set.get('version')}",
           "n_prompts": result.n_prompts, "tokens": result.n_tokens,
           "reference": Path(result.reference).name, "weights": result.weights, "head_rows": result.embedding,
           "threshold": round(result.threshold, 6), "checks": result.n_checks, "every": result.every,
           **({} if result.answer_threshold is None else {"answer_threshold": round(result.answer_threshold, 6)}),
           "surprisal_threshold": None if result.surprisal[0] is None else round(result.surprisal[0], 6),
           "surprisal_window": result.surprisal[1],
           "window": list(result.window) if getattr(result, "window", None) else None,
           "verdict_agreement": round(result.verdict_agreement, 6), "mean_abs_dp": round(result.mean_abs_dp, 6),
           "max_abs_dp": round(result.max_abs_dp, 6), "token_agreement": round(result.token_agreement, 6),
           "bar": bar}
    return {VERIFIED: "pass" if result.passed else "fail", VERIFICATION: json.dumps(rec, sort_keys=True)}


def read_stamp(path: str | Path) -> dict[str, str]:
    """The stamp keys a GGUF or ONNX file carries (empty when it has none)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return {k: props[k] for k in STAMP_KEYS if k in props}
    fields = read_gguf(path, "model").fields
    return {k: str(fields[k].contents()) for k in STAMP_KEYS if k in fields}


def write_stamped(src: str | Path, out: str | Path, stamp: dict[str, str] | None) -> Path:
    """Copy `src` to `out` (may be the same path) with its stamp replaced by `stamp` (None: removed)."""
    src, out = Path(src), Path(out)
    if src.suffix == ".onnx":
        return _write_stamped_onnx(src, out, stamp)
    reader = read_gguf(src, "model")
    kv = copied_fields(reader, drop=lambda k: k in STAMP_KEYS)
    kv += [scalar_kv(k, v) for k, v in (stamp or {}).items()]
    write_gguf(out, architecture(reader, str(src)), kv, copied_tensors(reader))
    return out


def _write_stamped_onnx(src: Path, out: Path, stamp: dict[str, str] | None) -> Path:
    import onnx

    model = onnx.load(str(src))
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in STAMP_KEYS]
    del model.metadata_props[:]
    for k, v in keep + list((stamp or {}).items()):
        e = model.metadata_props.add()
        e.key, e.value = k, v
    with atomic_output(out, suffix=".onnx.tmp") as tmp:
        onnx.save(model, str(tmp))
    return out
