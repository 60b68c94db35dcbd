"""llama.cpp's quantizer (through llama-cpp-python), the one call every quantized file goes through.

The runtime needs it to build the default model (folded at F16, then quantized: `default_model.py`); the
offline tool `convert quantize` adds the safety-metadata checks and the verification stamp around it.
llama.cpp chooses the per-tensor types and writes `general.file_type` itself.
"""
from __future__ import annotations

from pathlib import Path

from .backends.llama_file import init_llama, llama_errors
from .gguf_io import ConvertError

# name -> llama_ftype attribute of llama_cpp
QTYPES = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def llama_quantize(src: str | Path, dst: str | Path, qtype: str, threads: int = 0) -> None:
    """Write `src` quantized to `qtype` (a key of QTYPES) at `dst` (not atomic: callers write a temp file)."""
    import llama_cpp as ll

    if qtype not in QTYPES:
        raise ConvertError(f"unsupported quantization {qtype!r}; choose one of {', '.join(QTYPES)}")
    mark = init_llama()  # quiet llama.cpp logging, keep its errors for the message
    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, QTYPES[qtype])
    params.allow_requantize = True
    params.nthread = int(threads)
    rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        detail = "; ".join(llama_errors(mark)[-2:]) or f"code {rc}"
        raise ConvertError(f"llama.cpp could not quantize {src} to {qtype}: {detail}")
