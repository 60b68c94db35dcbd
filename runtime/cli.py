"""`python -m runtime chat [QUESTION]`: one answer, or an interactive multi-turn chat.

`python -m runtime serve`: the OpenAI-compatible local HTTP server (needs the `serve` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .cli_flags import (add_model_flags, add_policy_flags, add_sampling_flags, load_kwargs, policy_of,
                        sampling_kwargs)
from .errors import RuntimeSafetyError
from .policy import SafetyPolicy

DEFAULT_SERVE_NAME = "smollm2-135m-safe"  # the embedded default model's name on the local server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return f"safechat {v('safechat')} (llama-cpp-python {v('llama-cpp-python')})"


def add_verbs(sub) -> None:
    """chat, serve, plot, models: the runtime's verbs (also those of `safechat`, safechat/cli.py)."""
    ms = sub.add_parser("models", help="list, build, locate or remove the model files built into the cache")
    ms.add_argument("action", nargs="?", choices=("list", "pull", "path", "rm", "prune"), default="list",
                    help="list (default); pull: build the default model now; path: print where it is; "
                         "rm NAME...: delete built files; prune: delete every older default")
    ms.add_argument("names", nargs="*", metavar="NAME", help="for rm: the files' names as listed")
    c = sub.add_parser("chat", help="answer QUESTION once, or chat interactively when it is omitted")
    c.add_argument("question", nargs="?", help="the question; omit for an interactive chat (reads stdin)")
    c.add_argument("--system", help="a system message for the conversation")
    c.add_argument("--json", action="store_true", help="print the whole reply as JSON (text, refused, safety, usage)")
    add_model_flags(c)
    add_sampling_flags(c)
    add_policy_flags(c)
    pl = sub.add_parser("plot", help="answer QUESTION and draw its p_unsafe trace as a PNG (needs matplotlib)")
    pl.add_argument("question")
    pl.add_argument("--prefill", help="an assistant prefill the model continues (e.g. 'Sure, here is')")
    pl.add_argument("--out", default="safety_trace.png")
    pl.add_argument("--every", type=int, default=1, help="check every K tokens (default 1: the full trace)")
    add_model_flags(pl)
    add_sampling_flags(pl, max_tokens=64)
    s = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (needs pip install -e '.[serve]')")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--max-tokens-cap", type=int, default=4096, help="reject requests asking for more tokens")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="also let web pages from ORIGIN call the API (repeatable; '*' for any). Pages on "
                        "localhost / 127.0.0.1, any port, always may, as with Ollama")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="reject larger request bodies")
    s.add_argument("--max-queue", type=int, default=8, help="requests that may wait per model while it answers "
                   "one; more get HTTP 503 with Retry-After (default 8)")
    add_model_flags(s, many=True, serve_name=DEFAULT_SERVE_NAME)
    add_sampling_flags(s, max_tokens=None)  # the defaults of what a request leaves out
    add_policy_flags(s)


def _build_parser() -> argparse.ArgumentParser:
    prog = "safechat" if os.path.basename(sys.argv[0]) == "safechat" else "python -m runtime"
    ap = argparse.ArgumentParser(prog=prog, description="Local chat with an explicit safety signal")
    ap.add_argument("--version", action="version", version=_version())
    add_verbs(ap.add_subparsers(dest="cmd", required=True))
    return ap


def _parse_models(specs) -> dict:
    """['name=path', 'path'] -> {name: path}; a bare path is named after its file stem."""
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


def cmd_models(args, out=None) -> int:
    """The built models in `$SAFECHAT_CACHE/models`: list them, build the default (pull), print its path,
    remove some (rm), or every older default (prune). `out` defaults to sys.stdout as it is at the call (a
    default bound at import would keep whatever stream was current then)."""
    out = sys.stdout if out is None else out
    from .default_model import PREFIX, default_model_file, default_model_path

    if args.names and args.action != "rm":
        raise ValueError(f"models {args.action} takes no names (only rm does)")
    if args.action in ("pull", "path"):
        path = default_model_path() if args.action == "pull" else default_model_file()
        out.write(f"{path}\n")
        if not path.is_file():
            out.write("  (not built yet: `models pull` or the first chat builds it)\n")
        return 0
    folder = default_model_file().parent
    files = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    current = default_model_file().name
    by_name = {f.name: f for f in files}
    doomed = []
    if args.action == "rm" and not args.names:
        raise ValueError("models rm needs the names of the files to delete (as `models list` shows them)")
    for name in args.names:
        if name not in by_name:
            raise ValueError(f"no built model named {name!r} in {folder}")
        doomed.append(by_name[name])
    if args.action == "prune":
        doomed += [f for f in files if f.name.startswith(PREFIX) and f.name != current]
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
    policy, how = policy_of(args), load_kwargs(args)
    if policy == "off":
        print("warning: serving WITHOUT safety checks (--no-safety)", file=sys.stderr)
    if specs:
        models = {name: load(path, safety=policy, **how) for name, path in specs.items()}
    else:
        models = {DEFAULT_SERVE_NAME: load(safety=policy, **how)}
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(models, host=args.host, port=args.port, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
          max_tokens_cap=args.max_tokens_cap, max_queue=args.max_queue, cors_origins=args.cors_origin,
          defaults=sampling_kwargs(args))
    return 0


def cmd_plot(args) -> int:
    from .model import load
    from .plot import plot_trace

    model = load(args.model, **load_kwargs(args))
    meta = model.meta
    # the full trace: a file that checks only the prompt (answer threshold inf) gets answer checks that
    # practically never act (p_unsafe >= the largest float below 1), so there is something to plot
    answer = meta.answer_threshold
    answer = math.nextafter(1.0, 0.0) if answer is not None and math.isinf(answer) else answer
    policy = SafetyPolicy(every=args.every, threshold=meta.threshold, answer_threshold=answer)
    messages = [{"role": "user", "content": args.question}]
    if args.prefill:
        messages.append({"role": "assistant", "content": args.prefill})
    reply = model.chat(messages, safety=policy, **sampling_kwargs(args))
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
    gen = model.chat(messages, stream=True, **sampling_kwargs(args))
    with gen:  # closed however the loop ends (Ctrl-C included): the model is never left held
        for piece in gen:
            if not args.json:
                out.write(piece)
                out.flush()
    _print_reply_end(gen.reply, args.json, out)
    return gen.reply.text


def cmd_chat(args, out=None, inp=None) -> int:
    from .model import load

    out, inp = (sys.stdout if out is None else out), (sys.stdin if inp is None else inp)

    model = load(args.model, safety=policy_of(args), **load_kwargs(args))
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


def run(args) -> int:
    """Run a parsed runtime verb; a bad input is one line on stderr and exit status 2."""
    try:
        return {"serve": cmd_serve, "plot": cmd_plot, "models": cmd_models}.get(args.cmd, cmd_chat)(args)
    except (RuntimeSafetyError, ValueError, NotImplementedError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv=None) -> int:
    return run(_build_parser().parse_args(argv))
