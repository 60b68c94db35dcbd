"""`python -m safechat.convert`: fold a safety artifact into a GGUF, quantize it, verify it.

    safechat convert --base BASE.gguf --artifact DIR --out OUT.gguf [--quant F16|Q8_0|Q4_K_M|Q4_0|none] [--force]
    safechat quantize SAFE.gguf OUT.gguf --quant Q8_0 [--no-verify]
    safechat verify MODEL.gguf|MODEL.onnx [...] [--reference REF.gguf] [--json OUT.json] [--record]
    safechat export-onnx SAFE.gguf OUT.onnx [--quant int8|int4|int8-dynamic]

Errors are one line on stderr (`error: ...`) with exit code 2; `verify` exits 1 when a model
misses the bar (verdict agreement >= 99%, mean |delta p_unsafe| <= 0.02), and so do `quantize`
and `gguf --quant` when the file they wrote missed it (it is written, stamped
safety.verified=fail, and the runtime refuses it unless loaded with allow_unverified=True).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from runtime.artifact import ArtifactError, load_artifact
from runtime.contract import MetadataError
from runtime.files import temp_beside
from runtime.fold import check_compatible, ConvertError, read_gguf

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
    _print_verification(res.verification)


def _print_verification(v) -> None:
    """Say what was stamped into the file just written (`v`: a verify.ModelResult, None when skipped)."""
    if v is None:
        print("not verified (--no-verify): the file carries no verification stamp")
        return
    from .verify import markdown
    print(markdown([v]))
    if v.passed:
        print(f"verified against {v.reference}: pass (stamped safety.verified=pass)")
    else:
        print(f"verification FAILED against {v.reference}: stamped safety.verified=fail; the runtime refuses "
              "this file unless loaded with runtime.load(..., allow_unverified=True)")


def _log(a):
    return (lambda s: print(s, file=sys.stderr, flush=True)) if getattr(a, "verbose", False) else None


def _quantize(a, src: Path, out: Path, reference_label: str | None = None):
    from .quantize import quantize

    res = quantize(src, out, a.quant, threads=a.threads or 0, verify=not a.no_verify, n_tokens=a.tokens,
                   prompts=a.prompts, reference_label=reference_label, log=_log(a))
    _print_quant(res)
    return res


def _exit_code(res) -> int:
    return 1 if res.verification is not None and not res.verification.passed else 0


def cmd_gguf(a) -> int:
    from .hf_import import convert_any as convert_gguf  # a GGUF or a Hugging Face folder

    out = Path(a.out)
    base = Path(a.base)
    if out.resolve() == base.resolve():
        raise CliError("--out must differ from --base")
    art = load_artifact(a.artifact)
    if base.is_dir():  # a Hugging Face checkpoint folder (hf_import.py)
        from .hf_import import check_config
        check_config(base, art.hidden_size, art.card.get("base_vocab_size"))
    else:
        check_compatible(read_gguf(base), art, str(base), force=a.force)
    _check_writable(out)
    progress = not a.quiet
    rc = 0
    if a.quant == "none":
        meta = convert_gguf(base, art, out, progress=progress, force=a.force)
    else:
        tmp = temp_beside(out, ".unquantized.tmp")
        try:
            meta = convert_gguf(base, art, tmp, progress=progress, force=a.force)
            rc = _exit_code(_quantize(a, tmp, out, reference_label=f"{base.name} + artifact, unquantized"))
        finally:
            tmp.unlink(missing_ok=True)
    print(f"wrote {out} (safety format {meta.format_version}, token ids {meta.token_ids}, "
          f"threshold {meta.threshold:.4f})")
    return rc


def cmd_quantize(a) -> int:
    if a.quant == "none":
        raise CliError("--quant none: nothing to do")
    src, out = Path(a.src), Path(a.out)
    if out.resolve() == src.resolve():
        raise CliError("the output must differ from the input")
    if not src.is_file():
        raise CliError(f"model file not found: {src}")
    _check_writable(out)
    return _exit_code(_quantize(a, src, out))


def cmd_verify(a) -> int:
    import json

    from .stamp import stamp_of, write_stamped
    from .verify import NEAR, markdown, run_verify

    if a.json:
        _check_writable(Path(a.json))
    kw = {"prompts": a.prompts} if a.prompts else {}
    results, summary = run_verify(a.models, a.reference, a.tokens, threads=a.threads, log=_log(a), **kw)
    print(markdown(results))
    ps = summary["prompt_set"]
    print(f"\n{ps['n']} prompts ({ps['name']} v{ps['version']}), {a.tokens} greedy tokens; reference: torch "
          f"float32 of {a.reference or 'each model itself'}; bar: verdict agreement >= 99%, mean abs dp <= 0.02")
    for r in results:
        print(f"{Path(r.model).name}: {r.near_threshold} of {r.n_checks} reference verdicts within {NEAR} of their "
              "threshold (the margin: checks a rounding can flip)")
        if r.answer_threshold is not None:  # its checks inside the answer act, so they were compared too
            print(f"{Path(r.model).name}: {r.n_checks} checks compared, the end of each prompt and every "
                  f"{r.every} tokens of its answer (answer threshold {r.answer_threshold:.6g})")
    if a.record:
        for r in results:
            write_stamped(r.model, r.model, stamp_of(r, ps, summary["bar"]))
            print(f"recorded in {r.model}: safety.verified={'pass' if r.passed else 'fail'}")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0 if summary["passed"] else 1


def cmd_onnx(a) -> int:
    try:
        from .onnx_export import export_onnx
    except ImportError as e:
        raise CliError(f"the ONNX export needs torch, onnx and onnxscript ({e}): pip install -e '.[train,onnx]'")

    src, out = Path(a.gguf), Path(a.out)
    _check_writable(out)
    if not a.no_verify and src.resolve().parent != out.resolve().parent:
        raise CliError(f"verifying {out.name} needs {src.name} beside it (the ONNX backend reads its vocabulary "
                       "there): write the .onnx into the GGUF's folder, or pass --no-verify")
    if a.no_verify:
        export_onnx(src, out, a.quant, progress=not a.quiet)
        _print_verification(None)
    else:  # export to a temp file beside OUT, verify it, and write OUT only with its stamp
        from .stamp import stamp_of, write_stamped
        from .verify import run_verify

        tmp = temp_beside(out, ".tmp.onnx")
        try:
            export_onnx(src, tmp, a.quant, progress=not a.quiet)
            kw = {"prompts": a.prompts} if a.prompts else {}
            results, summary = run_verify([tmp], reference=src, n_tokens=a.tokens, threads=a.threads, log=_log(a),
                                          **kw)
            v = results[0]
            v.model = str(out)
            write_stamped(tmp, out, stamp_of(v, summary["prompt_set"], summary["bar"]))
        finally:
            tmp.unlink(missing_ok=True)
        _print_verification(v)
    print(f"wrote {out} (keep {src.name} beside it: the ONNX backend reads its vocabulary)")
    return 0 if a.no_verify or v.passed else 1


def _verify_options(p: argparse.ArgumentParser, when: str) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help=f"{when}skip verifying the written file against the torch reference (no stamp)")
    p.add_argument("--tokens", type=int, default=8,
                   help="verification: greedy tokens compared per prompt for the next-token agreement figure "
                        "(default 8; the bar uses only the end-of-prompt verdicts; `verify` defaults to 32)")
    p.add_argument("--prompts", help="verification: prompt set JSON (default: safechat/convert/verify_prompts_v2.json)")
    p.add_argument("-v", "--verbose", action="store_true", help="verification: per-prompt progress on stderr")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: up to 8)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m safechat.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("gguf", help="base GGUF + safety artifact -> safe GGUF (optionally quantized)")
    g.add_argument("--base", required=True,
                   help="base model: a GGUF, or a local Hugging Face Llama checkpoint folder (safetensors)")
    g.add_argument("--artifact", required=True, help="safety artifact directory (safety.safetensors + card.json)")
    g.add_argument("--out", required=True, help="output GGUF (written atomically)")
    g.add_argument("--quant", type=_quant_name, default="none",
                   help="quantize with llama.cpp: F16, Q8_0, Q4_K_M, Q4_0, or none (default: keep the base's types)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--force", action="store_true",
                   help="BASE is already a safe model: replace its safety tokens, rows and metadata")
    _verify_options(g, "with --quant: ")
    g.set_defaults(fn=cmd_gguf)

    q = sub.add_parser("quantize", help="quantize a safe GGUF with llama.cpp's quantizer, verify it, stamp the outcome")
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("--quant", type=_quant_name, required=True, help="F16, Q8_0, Q4_K_M or Q4_0")
    _verify_options(q, "")
    q.set_defaults(fn=cmd_quantize)

    o = sub.add_parser("onnx", help="safe GGUF -> ONNX with a KV cache and a dedicated safety output")
    o.add_argument("gguf", help="a safe GGUF (from `safechat convert`)")
    o.add_argument("out", help="output .onnx file (written atomically)")
    o.add_argument("--quant", choices=("int8", "int4", "int8-dynamic"), default=None,
                   help="onnxruntime weight quantization (int8 = 8-bit MatMulNBits, recommended)")
    o.add_argument("--quiet", action="store_true")
    _verify_options(o, "")
    o.set_defaults(fn=cmd_onnx)

    v = sub.add_parser("verify", help="compare GGUF (llama.cpp) or .onnx (onnxruntime) models against the torch "
                                      "model of a reference")
    v.add_argument("models", nargs="+", metavar="MODEL")
    v.add_argument("--reference", help="GGUF whose weights the torch reference uses (default: each model itself)")
    v.add_argument("--json", help="write the full results here")
    v.add_argument("--tokens", type=int, default=32, help="greedy tokens compared per prompt (default 32)")
    v.add_argument("--prompts",
                   help="prompt set JSON (default: safechat/convert/verify_prompts_v2.json; v1 reproduces older figures)")
    v.add_argument("-v", "--verbose", action="store_true", help="per-prompt progress on stderr")
    v.add_argument("--threads", type=int, default=None, help="CPU threads of the model's runtime (default: up to 8)")
    v.add_argument("--record", action="store_true",
                   help="stamp each MODEL with its outcome (safety.verified=pass|fail, rewritten atomically)")
    v.set_defaults(fn=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
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
