"""Quantize a (safe) GGUF with llama.cpp's own quantizer, as exposed by llama-cpp-python.

`quantize(src, dst, "Q8_0")` writes `dst` atomically (temp file + rename) and checks that the
`safety.*` metadata and the three control tokens came through unchanged. llama.cpp chooses the
per-tensor types itself; for a tied model the embedding (which holds the two head rows) is
treated as the output projection, so it usually gets a *higher* precision than the rest
(e.g. Q6_K for Q4_K_M, or its fallback when the row width is not a multiple of 256). The result
says which type it got.

Re-quantizing an already-quantized source (the default base is Q4_1 with a Q8_0 embedding)
compounds the error: the weights are dequantized and rounded a second time. The result carries
a note saying so; verification measures what it costs.

By default the quantized file is verified against the torch model of the source's weights
before it is written, and the outcome is stamped into its metadata (`stamp.py`): the runtime
refuses a file stamped "fail" unless told otherwise.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from runtime.files import temp_beside
from runtime.gguf_io import ConvertError, read_gguf
from runtime.contract import PREFIX, SPECIAL_TOKENS, STAMP_KEYS
from runtime.quantize import QTYPES, llama_quantize
from .stamp import stamp_of, write_stamped

_FLOAT = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}


@dataclass
class QuantizeResult:
    path: Path
    qtype: str
    embedding_type: str                 # type of token_embd.weight (holds [CLS] and, tied, the head rows)
    output_type: str | None             # type of output.weight (untied models: the head rows), else None
    tensor_types: dict[str, int]        # type name -> number of tensors
    source_types: dict[str, int]
    notes: list[str] = field(default_factory=list)
    verification: object = None          # verify.ModelResult when verified, else None

    def summary(self) -> str:
        types = ", ".join(f"{n} x{c}" for n, c in sorted(self.tensor_types.items(), key=lambda x: -x[1]))
        head = (f"head rows in output.weight ({self.output_type}), [CLS] row in token_embd ({self.embedding_type})"
                if self.output_type else f"[CLS] and head rows in token_embd.weight: {self.embedding_type}")
        return f"{self.path}: {self.qtype}; {head}; tensors: {types}"


def _types(reader: gguf.GGUFReader) -> Counter:
    return Counter(t.tensor_type.name for t in reader.tensors)


def _safety_fields(reader: gguf.GGUFReader) -> dict:
    """The safety.* fields that must come through quantization unchanged (not the verification stamp)."""
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(PREFIX) and k not in STAMP_KEYS}


def quantize(src: str | Path, dst: str | Path, qtype: str, *, threads: int = 0, verify: bool = True,
             n_tokens: int = 8, prompts: str | Path | None = None, reference_label: str | None = None,
             log=None) -> QuantizeResult:
    """Quantize `src` to `dst` (`qtype` in QTYPES) with llama.cpp; atomic; safety metadata checked.

    With `verify` (default) the quantized file is compared against the torch model of `src`'s
    weights (`verify.py`, needs torch) before it is written, and the outcome is stamped into its
    metadata (`stamp.py`): "pass", or "fail" (the file is still written, and the runtime refuses
    it unless told otherwise). Without, the file carries no stamp (a stale one from `src` is dropped).
    `n_tokens` greedy tokens per prompt give the next-token agreement figure (the bar itself uses only
    the end-of-prompt verdicts). `reference_label` names the reference in the stamp when `src` is a temp file.
    """
    qtype = qtype.upper()
    if qtype not in QTYPES:
        raise ConvertError(f"unsupported quantization {qtype!r}; choose one of {', '.join(QTYPES)}")
    src, dst = Path(src), Path(dst)
    reader = read_gguf(src, "model")
    before = _safety_fields(reader)
    tokens_before = reader.fields["tokenizer.ggml.tokens"].contents()[-3:]
    src_types = _types(reader)
    del reader

    notes = []
    already = sorted(n for n in src_types if gguf.GGMLQuantizationType[n] not in _FLOAT)
    if already and qtype == "F16":
        notes.append(f"the source is already quantized ({', '.join(already)}): F16 keeps those values (almost) "
                     "exactly but cannot restore the precision they lost; it only makes the file larger")
    elif already:
        notes.append(f"the source is already quantized ({', '.join(already)}): re-quantizing compounds the "
                     "error (weights are rounded twice); quantize from a float base when you have one")

    raw = temp_beside(dst, ".unstamped.tmp")
    try:
        llama_quantize(src, raw, qtype, threads)
        out = gguf.GGUFReader(str(raw))
        after = _safety_fields(out)
        if after != before:
            raise ConvertError(f"quantizing changed the safety metadata: {before} -> {after}")
        toks = out.fields["tokenizer.ggml.tokens"].contents()
        if before and (toks[-3:] != list(SPECIAL_TOKENS) or tokens_before != toks[-3:]):
            raise ConvertError("quantizing lost the safety control tokens")
        tensors = {t.name: t for t in out.tensors}
        emb = tensors["token_embd.weight"].tensor_type.name
        outp = tensors["output.weight"].tensor_type.name if "output.weight" in tensors else None
        result = QuantizeResult(dst, qtype, emb, outp, dict(_types(out)), dict(src_types), notes)
        del out, tensors
        stamp = None
        if verify:
            from .verify import run_verify

            kw = {"prompts": prompts} if prompts else {}
            results, summary = run_verify([raw], reference=src, n_tokens=n_tokens, threads=threads or None,
                                          log=log, **kw)
            results[0].model = str(dst)
            results[0].reference = reference_label or str(src)
            result.verification = results[0]
            stamp = stamp_of(results[0], summary["prompt_set"], summary["bar"])
        write_stamped(raw, dst, stamp)
    finally:
        raw.unlink(missing_ok=True)
    return result
