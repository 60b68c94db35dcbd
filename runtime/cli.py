"""`python -m runtime chat [QUESTION]`: one answer, or an interactive multi-turn chat.

`python -m runtime serve`: the OpenAI-compatible local HTTP server (needs the `serve` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .backends.base import CHAT_SAMPLING
from .errors import RuntimeSafetyError
from .policy import SafetyPolicy

DEFAULT_SERVE_NAME = "smollm2-135m-safe"  # the embedded default model's name on the local server


def _answer_threshold(text: str) -> float:
    return math.inf if text.lower() in ("never", "inf") else float(text)


def _add_category_rules(p) -> None:
    """The per-app rules over a model's category head (SafetyPolicy.allow / block / controversial)."""
    p.add_argument("--allow", action="append", default=[], metavar="CATEGORY",
                   help="answer a flagged request the category head confidently puts in CATEGORY (repeatable; "
                        "e.g. specialised_advice for a pharmacy assistant)")
    p.add_argument("--block", action="append", default=[], metavar="CATEGORY",
                   help="refuse requests the category head confidently puts in CATEGORY even when the safety "
                        "verdict clears them (repeatable; e.g. self_harm for a children's app)")
    p.add_argument("--controversial", choices=("strict", "loose"), default="strict",
                   help="loose: answer flagged requests of the controversial tier (default strict)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return f"safechat {v('safechat')} (llama-cpp-python {v('llama-cpp-python')})"


def _build_parser() -> argparse.ArgumentParser:
    prog = "safechat" if os.path.basename(sys.argv[0]) == "safechat" else "python -m runtime"
    ap = argparse.ArgumentParser(prog=prog, description="Local chat with an explicit safety signal")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="cmd", required=True)
    ms = sub.add_parser("models", help="list (or remove) the model files built into the cache")
    ms.add_argument("--remove", action="append", default=[], metavar="NAME",
                    help="delete this built file (its name as listed; repeatable)")
    ms.add_argument("--prune", action="store_true",
                    help="delete every built default model except the one this version uses")
    c = sub.add_parser("chat", help="answer QUESTION once, or chat interactively when it is omitted")
    c.add_argument("question", nargs="?", help="the question; omit for an interactive chat (reads stdin)")
    c.add_argument("--model", help="a safe GGUF model file (default: the embedded SmolLM2-135M safe model)")
    c.add_argument("--json", action="store_true", help="print the whole reply as JSON (text, refused, safety, usage)")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=CHAT_SAMPLING["temperature"],
                   help=f"sampling temperature (0: greedy; default {CHAT_SAMPLING['temperature']})")
    c.add_argument("--top-p", type=float, default=CHAT_SAMPLING["top_p"])
    c.add_argument("--repeat-penalty", type=float, default=CHAT_SAMPLING["repeat_penalty"])
    c.add_argument("--seed", type=int, default=None, help="a fixed seed repeats an answer (default: a fresh one)")
    c.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer where TEXT first appears (repeatable, at most 4)")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--every", type=int, default=SafetyPolicy.every, help="check the safety verdict every K tokens")
    c.add_argument("--patience", type=int, default=1, help="consecutive unsafe verdicts before acting")
    c.add_argument("--threshold", type=float, default=None,
                   help="act on p_unsafe >= this (default: the model file's calibrated threshold(s))")
    c.add_argument("--answer-threshold", type=_answer_threshold, default=None, metavar="P|never",
                   help="a separate threshold for the checks inside the answer; 'never': check only the prompt "
                        "(default: the model file's, else --threshold)")
    c.add_argument("--max-gap", type=int, default=None, help="adaptive: never more tokens than this between checks")
    c.add_argument("--entropy-trigger", type=float, default=None, help="adaptive: check after a token sampled "
                   "at this next-token entropy (nats) or more")
    c.add_argument("--margin-trigger", type=float, default=None, help="adaptive: check after a token whose top-1 "
                   "minus top-2 probability was this or less")
    c.add_argument("--sentence-ends", action="store_true", help="adaptive: check at sentence and line ends")
    c.add_argument("--action", choices=("refuse", "stop"), default="refuse")
    c.add_argument("--no-safety", action="store_true", help="run WITHOUT safety checks (baselines only)")
    c.add_argument("--system", help="a system message for the conversation")
    c.add_argument("--allow-unverified", action="store_true",
                   help="load a file whose verification stamp says it failed (convert verify)")
    _add_category_rules(c)
    pl = sub.add_parser("plot", help="answer QUESTION and draw its p_unsafe trace as a PNG (needs matplotlib)")
    pl.add_argument("question")
    pl.add_argument("--prefill", help="an assistant prefill the model continues (e.g. 'Sure, here is')")
    pl.add_argument("--out", default="safety_trace.png")
    pl.add_argument("--model", help="a safe GGUF model file (default: the embedded model)")
    pl.add_argument("--max-tokens", type=int, default=64)
    pl.add_argument("--every", type=int, default=1, help="check every K tokens (default 1: the full trace)")
    s = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (needs pip install -e '.[serve]')")
    s.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help=f"a safe GGUF model served as NAME (repeatable; the first is the default). "
                        f"Default: the embedded model as {DEFAULT_SERVE_NAME}")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--allow-unverified", action="store_true",
                   help="load a file whose verification stamp says it failed (convert verify)")
    s.add_argument("--max-tokens-cap", type=int, default=4096, help="reject requests asking for more tokens")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="also let web pages from ORIGIN call the API (repeatable; '*' for any). Pages on "
                        "localhost / 127.0.0.1, any port, always may, as with Ollama")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="reject larger request bodies")
    s.add_argument("--max-queue", type=int, default=8, help="requests that may wait per model while it answers "
                   "one; more get HTTP 503 with Retry-After (default 8)")
    _add_category_rules(s)
    return ap


def _parse_models(specs) -> dict:
    """['name=path', 'path'] -> {name: path}; a bare path is named after its file stem."""
    from pathlib import Path

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ValueError(f"--model expects NAME=PATH, got {spec!r}")
        if name in out:
            raise ValueError(f"model name {name!r} is given twice")
        out[name] = path
    return out


def cmd_models(args, out=sys.stdout) -> int:
    """The built models in `$SAFECHAT_CACHE/models`: name, size, which one the default is now."""
    from .artifact import load_artifact
    from .default_model import ASSET, WEIGHTS
    from .fetch import cache_dir

    folder = cache_dir() / "models"
    files = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    current = f"SmolLM2-135M-Instruct-safe-{load_artifact(ASSET).digest()[:12]}-{WEIGHTS}.gguf"
    by_name = {f.name: f for f in files}
    doomed = []
    for name in args.remove:
        if name not in by_name:
            raise ValueError(f"no built model named {name!r} in {folder}")
        doomed.append(by_name[name])
    if args.prune:
        doomed += [f for f in files if f.name.startswith("SmolLM2-135M-Instruct-safe-") and f.name != current]
    for f in dict.fromkeys(doomed):
        f.unlink()
        out.write(f"removed {f.name}\n")
    files = [f for f in files if f.exists()]
    out.write(f"{folder}: {len(files)} built model file(s)\n")
    for f in files:
        mark = "  (the default now)" if f.name == current else ""
        out.write(f"  {f.name}  {f.stat().st_size / 2 ** 20:.0f} MiB{mark}\n")
    if current not in {f.name for f in files}:
        out.write(f"  (the default, {current}, is built on the first chat)\n")
    return 0


def cmd_serve(args) -> int:
    try:
        from .server import serve
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .model import load

    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    specs = _parse_models(args.model)
    policy = SafetyPolicy(allow=args.allow, block=args.block, controversial=args.controversial)
    if specs:
        models = {name: load(path, threads=args.threads, allow_unverified=args.allow_unverified, safety=policy)
                  for name, path in specs.items()}
    else:
        models = {DEFAULT_SERVE_NAME: load(threads=args.threads, safety=policy)}
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(models, host=args.host, port=args.port, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
          max_tokens_cap=args.max_tokens_cap, max_queue=args.max_queue, cors_origins=args.cors_origin)
    return 0


def cmd_plot(args) -> int:
    from .model import load
    from .plot import plot_trace

    model = load(args.model)
    meta = model.meta
    # the full trace: a file that checks only the prompt (answer threshold inf) gets answer checks that
    # practically never act (p_unsafe >= the largest float below 1), so there is something to plot
    answer = meta.answer_threshold
    answer = math.nextafter(1.0, 0.0) if answer is not None and math.isinf(answer) else answer
    policy = SafetyPolicy(every=args.every, threshold=meta.threshold, answer_threshold=answer)
    messages = [{"role": "user", "content": args.question}]
    if args.prefill:
        messages.append({"role": "assistant", "content": args.prefill})
    reply = model.chat(messages, max_tokens=args.max_tokens, safety=policy)
    print(reply.text)
    print(f"wrote {plot_trace(reply, args.out)}", file=sys.stderr)
    return 0


def _print_reply_end(reply, as_json: bool, out) -> None:
    if as_json:
        out.write(json.dumps(reply.to_dict(), ensure_ascii=False) + "\n")
    elif reply.refused:
        out.write(f"\n[refused: {reply.safety.reason}]\n")
    else:
        out.write("\n")
    out.flush()


def _turn(model, messages, args, out) -> str:
    gen = model.chat(messages, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                     top_p=args.top_p, repeat_penalty=args.repeat_penalty, stop=args.stop, stream=True)
    with gen:  # closed however the loop ends (Ctrl-C included): the model is never left held
        for piece in gen:
            if not args.json:
                out.write(piece)
                out.flush()
    _print_reply_end(gen.reply, args.json, out)
    return gen.reply.text


def cmd_chat(args, out=sys.stdout, inp=sys.stdin) -> int:
    from .model import load

    safety = "off" if args.no_safety else SafetyPolicy(
        every=args.every, patience=args.patience, action=args.action, max_gap=args.max_gap,
        threshold=args.threshold, answer_threshold=args.answer_threshold,
        entropy_trigger=args.entropy_trigger, margin_trigger=args.margin_trigger, sentence_ends=args.sentence_ends,
        allow=args.allow, block=args.block, controversial=args.controversial)
    model = load(args.model, threads=args.threads, safety=safety, allow_unverified=args.allow_unverified)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.question is not None:
        _turn(model, history + [{"role": "user", "content": args.question}], args, out)
        return 0
    interactive = inp.isatty()
    if interactive:
        out.write(f"Chatting with {model.path.name} (safety {'OFF' if args.no_safety else 'on'}). "
                  "Empty line or Ctrl-D to quit.\n")
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = inp.readline()
        if not line or (interactive and not line.strip()):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        text = _turn(model, history, args, out)
        history.append({"role": "assistant", "content": text})


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return {"serve": cmd_serve, "plot": cmd_plot, "models": cmd_models}.get(args.cmd, cmd_chat)(args)
    except (RuntimeSafetyError, ValueError, NotImplementedError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
