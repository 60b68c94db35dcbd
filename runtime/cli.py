"""`python -m runtime chat [QUESTION]`: one answer, or an interactive multi-turn chat."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import RuntimeSafetyError
from .strategy import SafetyPolicy


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime", description="Local chat with an explicit safety signal")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("chat", help="answer QUESTION once, or chat interactively when it is omitted")
    c.add_argument("question", nargs="?", help="the question; omit for an interactive chat (reads stdin)")
    c.add_argument("--model", help="a safe GGUF model file (default: the embedded SmolLM2-135M safe model)")
    c.add_argument("--json", action="store_true", help="print the whole reply as JSON (text, refused, safety, usage)")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--every", type=int, default=SafetyPolicy.every, help="check the safety verdict every K tokens")
    c.add_argument("--patience", type=int, default=1, help="consecutive unsafe verdicts before acting")
    c.add_argument("--action", choices=("refuse", "stop"), default="refuse")
    c.add_argument("--no-safety", action="store_true", help="run WITHOUT safety checks (baselines only)")
    c.add_argument("--system", help="a system message for the conversation")
    return ap


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
                     stream=True)
    for piece in gen:
        if not args.json:
            out.write(piece)
            out.flush()
    _print_reply_end(gen.reply, args.json, out)
    return gen.reply.text


def cmd_chat(args, out=sys.stdout, inp=sys.stdin) -> int:
    from .model import load

    safety = "off" if args.no_safety else SafetyPolicy(every=args.every, patience=args.patience, action=args.action)
    model = load(args.model, threads=args.threads, safety=safety)
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
        return cmd_chat(args)
    except (RuntimeSafetyError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
