"""`python -m convert`: fold a safety artifact into a GGUF, quantize it, verify it.

    python -m convert gguf --base BASE.gguf --artifact DIR --out OUT.gguf [--quant F16|Q8_0|Q4_K_M|Q4_0|none]
    python -m convert quantize SAFE.gguf OUT.gguf --quant Q8_0
    python -m convert verify MODEL.gguf [MODEL2.gguf ...] [--reference REF.gguf] [--json OUT.json] [--tokens 32]

Errors are one line on stderr (`error: ...`) with exit code 2; `verify` exits 1 when a model
misses the bar (verdict agreement >= 99%, mean |delta p_unsafe| <= 0.02).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

QUANTS = ("none", "F16", "Q8_0", "Q4_K_M", "Q4_0")


class CliError(Exception):
    pass


def _check_writable(out: Path) -> None:
    """Fail before any work when `out` cannot be written (a real write test: root ignores modes)."""
    if out.is_dir():
        raise CliError(f"output path {out} is a directory")
    parent = out.parent
    blocker = next((d for d in [parent, *parent.parents] if d.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CliError(f"output path {out} is not writable: {blocker} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=out.name + ".", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CliError(f"output path {out} is not writable: {e.strerror or e}") from None


def _quant_name(s: str) -> str:
    for q in QUANTS:
        if s.lower() == q.lower():
            return q
    raise argparse.ArgumentTypeError(f"choose one of {', '.join(QUANTS)}")


def _print_quant(res) -> None:
    print(f"quantized: {res.summary()}")
    for n in res.notes:
        print(f"note: {n}")


def cmd_gguf(a) -> int:
    from .artifact import load_artifact
    from .gguf_safe import check_compatible, convert_gguf, read_gguf

    out = Path(a.out)
    base = Path(a.base)
    if out.resolve() == base.resolve():
        raise CliError("--out must differ from --base")
    art = load_artifact(a.artifact)
    reader = read_gguf(base)
    check_compatible(reader, art, str(base))
    del reader
    _check_writable(out)
    progress = not a.quiet
    if a.quant == "none":
        meta = convert_gguf(base, art, out, progress=progress)
    else:
        from .quantize import quantize
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".unquantized.tmp", dir=out.parent)
        os.close(fd)
        try:
            meta = convert_gguf(base, art, tmp, progress=progress)
            _print_quant(quantize(tmp, out, a.quant))
        finally:
            Path(tmp).unlink(missing_ok=True)
    print(f"wrote {out} (safety format {meta.format_version}, token ids {meta.token_ids}, "
          f"threshold {meta.threshold:.4f})")
    return 0


def cmd_quantize(a) -> int:
    from .quantize import quantize

    if a.quant == "none":
        raise CliError("--quant none: nothing to do")
    src, out = Path(a.src), Path(a.out)
    if out.resolve() == src.resolve():
        raise CliError("the output must differ from the input")
    if not src.is_file():
        raise CliError(f"model file not found: {src}")
    _check_writable(out)
    _print_quant(quantize(src, out, a.quant))
    return 0


def cmd_verify(a) -> int:
    import json

    from .verify import markdown, run_verify

    log = (lambda s: print(s, file=sys.stderr, flush=True)) if a.verbose else None
    if a.json:
        _check_writable(Path(a.json))
    kw = {"prompts": a.prompts} if a.prompts else {}
    results, summary = run_verify(a.models, a.reference, a.tokens, log=log, **kw)
    print(markdown(results))
    ps = summary["prompt_set"]
    print(f"\n{ps['n']} prompts ({ps['name']} v{ps['version']}), {a.tokens} greedy tokens; reference: torch "
          f"float32 of {a.reference or 'each model itself'}; bar: verdict agreement >= 99%, mean abs dp <= 0.02")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0 if summary["passed"] else 1


def cmd_onnx(a) -> int:
    try:
        from .onnx_export import export_onnx
    except ImportError as e:
        raise CliError(f"the ONNX export needs torch, onnx and onnxscript ({e}): pip install -e '.[train,onnx]'")
    _check_writable(Path(a.out))
    export_onnx(a.gguf, a.out, a.quant, progress=not a.quiet)
    print(f"wrote {a.out} (keep {Path(a.gguf).name} beside it: the ONNX backend reads its vocabulary)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("gguf", help="base GGUF + safety artifact -> safe GGUF (optionally quantized)")
    g.add_argument("--base", required=True, help="base model GGUF (without safety tokens)")
    g.add_argument("--artifact", required=True, help="safety artifact directory (safety.safetensors + card.json)")
    g.add_argument("--out", required=True, help="output GGUF (written atomically)")
    g.add_argument("--quant", type=_quant_name, default="none",
                   help="quantize with llama.cpp: F16, Q8_0, Q4_K_M, Q4_0, or none (default: keep the base's types)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(fn=cmd_gguf)

    q = sub.add_parser("quantize", help="quantize a safe GGUF with llama.cpp's quantizer")
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("--quant", type=_quant_name, required=True, help="F16, Q8_0, Q4_K_M or Q4_0")
    q.set_defaults(fn=cmd_quantize)

    o = sub.add_parser("onnx", help="safe GGUF -> ONNX with a KV cache and a dedicated safety output")
    o.add_argument("gguf", help="a safe GGUF (from `python -m convert gguf`)")
    o.add_argument("out", help="output .onnx file (written atomically)")
    o.add_argument("--quant", choices=("int8", "int4", "int8-dynamic"), default=None,
                   help="onnxruntime weight quantization (int8 = 8-bit MatMulNBits, recommended)")
    o.add_argument("--quiet", action="store_true")
    o.set_defaults(fn=cmd_onnx)

    v = sub.add_parser("verify", help="compare GGUF models (llama.cpp) against the torch model of a reference")
    v.add_argument("models", nargs="+", metavar="MODEL")
    v.add_argument("--reference", help="GGUF whose weights the torch reference uses (default: each model itself)")
    v.add_argument("--json", help="write the full results here")
    v.add_argument("--tokens", type=int, default=32, help="greedy tokens compared per prompt (default 32)")
    v.add_argument("--prompts", help="prompt set JSON (default: convert/verify_prompts_v1.json)")
    v.add_argument("-v", "--verbose", action="store_true", help="per-prompt progress on stderr")
    v.set_defaults(fn=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    from .artifact import ArtifactError
    from .gguf_safe import ConvertError
    from .metadata import MetadataError
    from .verify import VerifyError

    a = build_parser().parse_args(argv)
    if getattr(a, "tokens", 1) < 1:
        print("error: --tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        return a.fn(a)
    except (CliError, ArtifactError, ConvertError, VerifyError, MetadataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
