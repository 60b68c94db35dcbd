"""`safechat VERB ...`: the one command line (also `python -m safechat`).

chat, serve, plot and models are the runtime's own verbs (runtime/cli.py, which `python -m runtime`
also runs); convert, quantize, export-onnx and verify are the offline tools (`python -m safechat.convert`);
`train VERB` and `bench VERB` hand the rest of the line to `safechat train` / `safechat bench`.
Every verb answers --help. This package sits above all the others (docs/design.md): it imports
them, nothing imports it, and it loads a verb's package only when that verb runs (torch, for
`train`, is an optional extra).
"""
from __future__ import annotations

import argparse
import sys

from runtime import cli as runtime_cli
from runtime.errors import RuntimeSafetyError

# verb -> (help, the verb of `python -m safechat.convert` it runs); the line after the verb is passed on as it is
CONVERT = {"convert": ("fold a safety artifact into a base GGUF: a safe GGUF (optionally quantized)", "gguf"),
           "quantize": ("quantize a safe GGUF with llama.cpp's quantizer, verify it, stamp the outcome", "quantize"),
           "export-onnx": ("safe GGUF -> ONNX with a KV cache and a dedicated safety output", "onnx"),
           "verify": ("compare a safe GGUF or .onnx against the torch reference (the gate before shipping)",
                      "verify")}
PACKAGES = {"train": "train the safety signal, calibrate and evaluate it (needs the train extra: "
                     "pip install -e '.[train]')",
            "bench": "speed, memory and safety benchmarks that print tables"}


def _convert(verb: str, rest: list[str]) -> int:
    from safechat.convert.__main__ import main as convert_main
    return convert_main([CONVERT[verb][1], *rest])


def _train(rest: list[str]) -> int:
    try:
        from safechat.train.__main__ import main as train_main
    except ImportError as e:
        print(f"error: `safechat train` needs the train extra ({e}); install it with pip install -e '.[train]'",
              file=sys.stderr)
        return 2
    return train_main(rest)


def _bench(rest: list[str]) -> int:
    from safechat.bench.__main__ import main as bench_main
    return bench_main(rest)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="safechat", description="Local chat with an explicit safety signal. "
                                 "VERB --help describes each verb.")
    ap.add_argument("--version", action="version", version=runtime_cli._version())
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="VERB")
    runtime_cli.add_verbs(sub)
    for verb, (text, _) in CONVERT.items():  # listed here; their options are parsed by `python -m safechat.convert`
        sub.add_parser(verb, help=text, add_help=False)
    for verb, text in PACKAGES.items():
        sub.add_parser(verb, help=text, add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb, rest = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if verb in CONVERT:
            return _convert(verb, rest)
        if verb == "train":
            return _train(rest)
        if verb == "bench":
            return _bench(rest)
    except (RuntimeSafetyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    args = _parser().parse_args(argv)
    return runtime_cli.run(args)
