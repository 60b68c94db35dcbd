"""The flags `chat`, `plot` and `serve` share, and what they turn into (load keywords, a policy, sampling).

One definition per flag: `safechat chat --n-ctx 2048 --temperature 0 --every 2` and
`safechat serve --n-ctx 2048 --temperature 0 --every 2` mean the same model, the same sampling
(for serve: what a request leaves out) and the same safety policy.
"""
from __future__ import annotations

import argparse
import math

from .backends.base import CHAT_SAMPLING
from .contract import parse_window
from .model import BACKENDS
from .policy import SafetyPolicy


def _answer_threshold(text: str) -> float:
    return math.inf if text.lower() in ("never", "inf") else float(text)


def window_arg(text: str, allow_all: bool = True):
    """--window R1,R2,R3 (or "all": every check sees everything, whatever the model file says)."""
    if allow_all and text.strip().lower() == "all":
        return "all"
    try:
        return parse_window(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_flags(p, many: bool = False, serve_name: str = "") -> None:
    """--model and how to load it: --backend, --n-ctx, --n-gpu-layers, --threads, --allow-unverified."""
    if many:
        p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                       help="a safe model file served as NAME (default: its file name; repeatable, the first is "
                            f"the default). Default: the embedded model as {serve_name}")
    else:
        p.add_argument("--model", metavar="PATH",
                       help="a safe model file (default: the embedded SmolLM2-135M safe model)")
    p.add_argument("--backend", choices=BACKENDS, default="llama",
                   help="llama: a GGUF through llama.cpp (default); onnx: an exported .onnx through onnxruntime")
    p.add_argument("--n-ctx", type=int, default=4096, help="context window in tokens (default 4096)")
    p.add_argument("--n-gpu-layers", type=int, default=0,
                   help="layers offloaded to a GPU by a GPU build of llama.cpp (default 0: CPU only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: up to 8)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load a file whose verification stamp says it failed (convert verify)")


def load_kwargs(args) -> dict:
    """runtime.load keywords from the model flags."""
    if args.n_ctx < 16:
        raise ValueError(f"--n-ctx must be at least 16, got {args.n_ctx}")
    if args.n_gpu_layers < 0:
        raise ValueError(f"--n-gpu-layers must be >= 0, got {args.n_gpu_layers}")
    return dict(backend=args.backend, n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers, threads=args.threads,
                allow_unverified=args.allow_unverified)


def add_sampling_flags(p, max_tokens: int | None = 256) -> None:
    """--max-tokens, --temperature, --top-k, --top-p, --min-p, --repeat-penalty, --seed, --stop."""
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="the longest answer in tokens" + (f" (default {max_tokens})" if max_tokens else ""))
    p.add_argument("--temperature", type=float, default=CHAT_SAMPLING["temperature"],
                   help=f"sampling temperature (0: greedy; default {CHAT_SAMPLING['temperature']})")
    p.add_argument("--top-k", type=int, default=CHAT_SAMPLING["top_k"])
    p.add_argument("--top-p", type=float, default=CHAT_SAMPLING["top_p"])
    p.add_argument("--min-p", type=float, default=CHAT_SAMPLING["min_p"])
    p.add_argument("--repeat-penalty", type=float, default=CHAT_SAMPLING["repeat_penalty"])
    p.add_argument("--seed", type=int, default=None, help="a fixed seed repeats an answer (default: a fresh one)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer where TEXT first appears (repeatable, at most 4)")


def sampling_kwargs(args) -> dict:
    """Model.chat keywords from the sampling flags (checked there: a bad value is a ParameterError)."""
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)
    if args.max_tokens is not None:
        kw["max_tokens"] = args.max_tokens
    return kw


def add_policy_flags(p) -> None:
    """The safety policy: when to check, at which thresholds, what to do; the per-app category rules."""
    p.add_argument("--every", type=int, default=None,
                   help="check the safety verdict every K tokens (default: the cadence the model file was "
                        "calibrated at, else 4)")
    p.add_argument("--patience", type=int, default=1, help="consecutive unsafe verdicts before acting")
    p.add_argument("--threshold", type=float, default=None,
                   help="act on p_unsafe >= this (default: the model file's calibrated threshold(s))")
    p.add_argument("--answer-threshold", type=_answer_threshold, default=None, metavar="P|never",
                   help="a separate threshold for the checks inside the answer; 'never': check only the prompt "
                        "(default: the model file's, else --threshold)")
    p.add_argument("--surprisal-threshold", type=_answer_threshold, default=None, metavar="NATS|never",
                   help="also refuse a prompt whose user text reaches this gibberish evidence (runtime/surprisal.py; "
                        "'never': off; default: the model file's, else off)")
    p.add_argument("--surprisal-window", type=int, default=None, metavar="W",
                   help="tokens per surprisal window (default: the model file's, else 8)")
    p.add_argument("--window", type=window_arg, default=None, metavar="R1,R2,R3|all",
                   help="windowed checks inside the answer (runtime/window.py): the last R2 answer tokens after a "
                        "cleared prompt, the prompt and the first R1 after a flagged one, R2 before and R3 after a "
                        "flip; 'all': every check sees everything (default: the model file's, else all)")
    p.add_argument("--max-gap", type=int, default=None, help="adaptive: never more tokens than this between checks")
    p.add_argument("--entropy-trigger", type=float, default=None, help="adaptive: check after a token sampled "
                   "at this next-token entropy (nats) or more")
    p.add_argument("--margin-trigger", type=float, default=None, help="adaptive: check after a token whose top-1 "
                   "minus top-2 probability was this or less")
    p.add_argument("--sentence-ends", action="store_true", help="adaptive: check at sentence and line ends")
    p.add_argument("--action", choices=("refuse", "stop"), default="refuse")
    p.add_argument("--no-safety", action="store_true", help="run WITHOUT safety checks (baselines only)")
    p.add_argument("--allow", action="append", default=[], metavar="CATEGORY",
                   help="answer a flagged request the category head confidently puts in CATEGORY (repeatable; "
                        "e.g. specialised_advice for a pharmacy assistant)")
    p.add_argument("--block", action="append", default=[], metavar="CATEGORY",
                   help="refuse requests the category head confidently puts in CATEGORY even when the safety "
                        "verdict clears them (repeatable; e.g. self_harm for a children's app)")
    p.add_argument("--controversial", choices=("strict", "loose"), default="strict",
                   help="loose: answer flagged requests of the controversial tier (default strict)")


def policy_of(args):
    """The SafetyPolicy the policy flags describe, or "off" for --no-safety."""
    if args.no_safety:
        return "off"
    return SafetyPolicy(every=args.every, patience=args.patience, action=args.action, max_gap=args.max_gap,
                        threshold=args.threshold, answer_threshold=args.answer_threshold,
                        entropy_trigger=args.entropy_trigger, margin_trigger=args.margin_trigger,
                        sentence_ends=args.sentence_ends, allow=args.allow, block=args.block,
                        controversial=args.controversial, surprisal_threshold=args.surprisal_threshold,
                        surprisal_window=args.surprisal_window, window=args.window)
