"""The cost of safety: plain llama-cpp-python against the runtime with checks off / every k / default.

    safechat bench overhead [--model PATH] [--tokens 128] [--runs 5] [--every 1 4 8] [--onnx PATH]
                             [--n-gpu-layers N] [--threads N] [--png out.png] [--json out.json]

One process, one fixed benign prompt, greedy, fixed length. Configurations, each with one warm-up
run, are run round-robin (run 1 of every configuration, then run 2, ...), so drift of the machine
spreads over all of them; the table shows medians over `--runs`.

* **plain**: llama-cpp-python's high-level `Llama` on the same GGUF, fed the runtime's own prompt
  tokens, through `Llama.generate` (its leanest high-level loop: decode + llama.cpp sampler, no
  per-token stop-string scan), detokenizing each token as a streaming client would. `reset()`
  before each run, so it re-reads the prompt like the runtime does (no prefix-cache advantage).
  Flash attention on, which is what the runtime's context (llama.cpp's "auto") resolves to on the
  CPU and on CUDA; the same threads, n_ctx, n_batch and n_gpu_layers as the runtime.
* **runtime**: `Model.chat(..., stream=True)` with `safety="off"`, `SafetyPolicy(every=k)` and the
  default `SafetyPolicy()`, each with threshold 0.999999 so no verdict ends a run early (a check
  costs the same whatever its verdict); the default keeps the model file's answer threshold, so
  a model calibrated to check only the prompt (`train calibrate`) is measured that way. In both
  decode-loop modes (`native=True`: the C loop; `native=False`: the pure-Python loop) when the
  runtime has the switch; with `--onnx`, the same policies on `backend="onnx"` (CUDA provider
  with `--n-gpu-layers` when onnxruntime has it).

Columns: tokens/s = generated tokens / wall time of the call (the runtime's prompt formatting,
the prefill and the hold-back included; the footer gives what formatting costs per call); time vs
plain and vs checks off = ratio of time per token, minus one; TTFT = time to the first streamed
text piece (the hold-back buffer delays it until a check has covered it); checks per generated
token (the check on the prompt, which rides on the prefill, not counted); peak RSS = the kernel's
high-water mark (VmHWM, reset through /proc/self/clear_refs before each run) during the run,
median over runs, with every model of the benchmark loaded; RSS growth = that peak minus RSS at the
start of the run. The footer gives what each load added and the process peak.

**Python share**: after the timed runs, one more instrumented run per configuration times the
engine: every llama.cpp/onnxruntime call made from Python is wrapped with a clock pair
(safechat/bench/engine_time.py), and the native loop reports its own time inside C (`usage.native_seconds`).
Python share = (wall - engine time - native loop time) / wall: the strategy, ctypes glue,
detokenizing and the caller's loop. This times the very calls it attributes, in the run it
reports, with no profiler hooks on every Python line (cProfile would inflate the Python side many
times), and needs no second run to subtract (on a machine that drifts 10% between runs a difference
of runs cannot resolve a 1% share). The wrapper's own cost counts as Python, so it errs high.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from runtime.default_model import default_model_path
from runtime.strategy import SafetyPolicy

from .common import (PROMPT, SPEED_THRESHOLD, fmt, load_runtime, markdown_table, median, mode_label,
                     peak_since_reset_mb, process_peak_mb, reset_peak, rss_mb, runtime_modes)
from .engine_time import engine_timer

PLAIN = "llama-cpp-python Llama (no safety)"


class Outcome(NamedTuple):
    """What one call reports: generated tokens, when its first text piece came, checks, ..."""
    tokens: int
    first_piece_at: float | None             # perf_counter() time
    checks: int
    refused: bool
    native_seconds: float | None             # time inside the runtime's native loop, if it ran


@dataclass
class Run:
    tokens: int
    seconds: float
    ttft: float | None
    checks: int
    rss_start_mb: float
    peak_rss_mb: float | None                # VmHWM during the run (None where it cannot be reset)
    refused: bool = False
    engine_seconds: float | None = None      # instrumented run only: engine calls + native loop
    engine_calls: dict | None = None         # instrumented run only: name -> [seconds, calls]

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Config:
    name: str
    group: str                               # rows of one loaded model: the "vs checks off" reference
    policy: str                              # "checks off", "check every 4", ...
    call: Callable[[], Outcome]
    session: object = None                   # an onnxruntime session to time, if any
    runs: list[Run] = field(default_factory=list)
    profile: Run | None = None


def measure(cfg: Config, instrument: bool = False) -> Run:
    can_reset = reset_peak()
    start = rss_mb()
    t0 = time.perf_counter()
    if instrument:
        with engine_timer(cfg.session) as timer:
            o = cfg.call()
    else:
        o = cfg.call()
    wall = time.perf_counter() - t0
    run = Run(o.tokens, wall, None if o.first_piece_at is None else o.first_piece_at - t0, o.checks, start,
              peak_since_reset_mb() if can_reset else None, o.refused)
    if instrument:
        native = o.native_seconds or 0.0
        run.engine_seconds = timer.seconds + native
        run.engine_calls = dict(timer.by_call, **({"native loop": [native, 1]} if native else {}))
    return run


def runtime_call(model, safety, n: int) -> Callable[[], Outcome]:
    def call():
        g = model.chat(PROMPT, max_tokens=n, safety=safety, stream=True)
        first = None
        for _ in g:
            if first is None:
                first = time.perf_counter()
        r = g.reply
        return Outcome(r.usage.completion_tokens, first, r.safety.checks, r.refused,
                       getattr(r.usage, "native_seconds", None))
    return call


def plain_call(llm, prompt_tokens: list[int], n: int, is_eog) -> Callable[[], Outcome]:
    def call():
        llm.reset()
        first, count = None, 0
        for tok in llm.generate(prompt_tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
            if is_eog(tok):
                break
            llm.detokenize([tok])
            if first is None:
                first = time.perf_counter()
            count += 1
            if count >= n:
                break
        return Outcome(count, first, 0, False, None)
    return call


def policy_rows(policy_label: str, every: list[int], answer_threshold: float | None = None) -> list[tuple[str, object]]:
    """The runtime's configurations; the default one keeps the model file's answer threshold (inf: none there)."""
    rows = [("checks off", "off")]
    rows += [(f"check every {k}", SafetyPolicy(every=k, threshold=SPEED_THRESHOLD)) for k in every]
    rows.append((policy_label, dataclasses.replace(SafetyPolicy(), threshold=SPEED_THRESHOLD,
                                                   answer_threshold=answer_threshold)))
    return rows


def describe_default(answer_threshold: float | None = None, every: int | None = None) -> str:
    """The default policy's row label for a file with this answer threshold and calibrated cadence."""
    if answer_threshold is not None and math.isinf(answer_threshold):
        return "default policy (model file: the prompt only, no checks inside the answer)"
    p, parts = SafetyPolicy().with_every(every), []
    if p.every:
        parts.append(f"every {p.every}")
    if p.max_gap:
        parts.append(f"max gap {p.max_gap}")
    if p.entropy_trigger is not None:
        parts.append(f"entropy >= {p.entropy_trigger:g}")
    if p.margin_trigger is not None:
        parts.append(f"margin <= {p.margin_trigger:g}")
    if p.sentence_ends:
        parts.append("sentence ends")
    return f"default policy ({', '.join(parts)})"


@dataclass
class Setup:
    configs: list[Config]
    info: dict                                # model, threads, prompt tokens, RSS added by each load
    keep: list                                # the loaded models (alive until the end)


def build(args) -> Setup:
    """Load every model once; one Config per (model, policy)."""
    from llama_cpp import Llama

    loads: dict[str, float] = {}
    keep: list = []

    def timed_load(label, fn):
        before = rss_mb()
        obj = fn()
        loads[label] = rss_mb() - before
        keep.append(obj)
        return obj

    path = args.model
    if path is None:
        path = default_model_path()
    from runtime.backends.llama import LlamaModelFile
    meta_file = LlamaModelFile(path, vocab_only=True)
    meta = meta_file.safety_meta()
    answer = meta.answer_threshold  # the default policy follows the model file
    meta_file.close()
    rows = policy_rows(describe_default(answer, meta.every), args.every, answer)
    configs, models = [], []
    for mode in runtime_modes():
        label = "runtime" + mode_label(mode)
        try:
            m = timed_load(label, lambda: load_runtime(path, mode, threads=args.threads,
                                                      n_gpu_layers=args.n_gpu_layers))
        except Exception as e:  # noqa: BLE001 - e.g. the native loop not built: report and go on
            print(f"note: {label} skipped: {type(e).__name__}: {e}")
            continue
        models.append(m)
        configs += [Config(f"{label}, {name}", label, name, runtime_call(m, s, args.tokens)) for name, s in rows]
    if not models:
        raise SystemExit("the runtime could not load the model in any mode")
    ref = models[0]
    prompt = ref.tokenize_messages(PROMPT)
    llm = timed_load("llama-cpp-python Llama", lambda: Llama(
        str(ref.path), n_ctx=ref.backend.n_ctx, n_batch=512, n_threads=ref.backend_threads,
        n_threads_batch=ref.backend_threads, n_gpu_layers=args.n_gpu_layers, flash_attn=True, verbose=False))
    configs.insert(0, Config(PLAIN, "plain", "plain", plain_call(llm, prompt, args.tokens, ref.backend.is_eog)))
    if args.onnx:
        cuda = bool(args.n_gpu_layers) and _onnx_has_cuda()
        if args.n_gpu_layers and not cuda:
            print("note: onnxruntime has no CUDAExecutionProvider here; the ONNX rows run on the CPU")
        label = f"onnx ({'CUDA' if cuda else 'CPU'})"
        mo = timed_load(label, lambda: load_runtime(args.onnx, None, backend="onnx", threads=args.threads,
                                                    n_gpu_layers=1 if cuda else 0))
        configs += [Config(f"{label}, {name}", label, name, runtime_call(mo, s, args.tokens), mo.file.session)
                    for name, s in rows]
    info = {"model": str(ref.path), "onnx": args.onnx, "threads": ref.backend_threads, "prompt_tokens": len(prompt),
            "prompt_prep_ms": _prompt_prep_ms(ref), "load_rss_mb": loads}
    return Setup(configs, info, keep)


def _prompt_prep_ms(model, repeats: int = 5) -> float:
    """What the runtime spends per call formatting and tokenizing the prompt (median, ms)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.tokenize_messages(PROMPT)
        times.append(time.perf_counter() - t)
    return median(times) * 1000


def _onnx_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def run_all(configs: list[Config], runs: int, warmup: int = 1) -> None:
    for _ in range(warmup):
        for c in configs:
            measure(c)
    for _ in range(runs):
        for c in configs:
            c.runs.append(measure(c))
    for c in configs:
        c.profile = measure(c, instrument=True)


def _slower(ref: float | None, tps: float | None) -> float | None:
    """How much more time per token than the reference (+0.25 = 25% slower)."""
    return ref / tps - 1 if ref and tps else None


def summarize(configs: list[Config]) -> list[dict]:
    tps = {c.name: median(r.tps for r in c.runs) for c in configs}
    plain = next((tps[c.name] for c in configs if c.group == "plain"), None)
    off = {c.group: tps[c.name] for c in configs if c.policy == "checks off"}
    out = []
    for c in configs:
        t, p = tps[c.name], c.profile
        py = None
        if p is not None and p.engine_seconds is not None and p.seconds > 0:
            py = max(0.0, p.seconds - p.engine_seconds)
        out.append({
            "name": c.name, "group": c.group, "policy": c.policy, "tokens": median(r.tokens for r in c.runs),
            "tok_s": t, "vs_plain": _slower(plain, t), "vs_checks_off": _slower(off.get(c.group), t),
            "checks_per_token": median(max(r.checks - 1, 0) / r.tokens for r in c.runs if r.tokens),
            "ttft_ms": median(r.ttft * 1000 if r.ttft is not None else None for r in c.runs),
            "python_share": py / p.seconds if py is not None else None,
            "python_ms_per_token": py * 1000 / p.tokens if py is not None and p.tokens else None,
            "peak_rss_mb": median(r.peak_rss_mb for r in c.runs),
            "rss_growth_mb": median(r.peak_rss_mb - r.rss_start_mb if r.peak_rss_mb is not None else None
                                    for r in c.runs),
            "refused_runs": sum(r.refused for r in c.runs),
        })
    return out


def table(summary: list[dict]) -> str:
    headers = ["configuration", "tokens", "checks / token", "tok/s", "time vs plain", "time vs checks off",
               "TTFT ms", "Python share", "Python ms / token", "peak RSS MB", "RSS growth in run MB"]
    rows = [[s["name"], fmt(s["tokens"], ".0f"), fmt(s["checks_per_token"], ".3f"), fmt(s["tok_s"]),
             fmt(s["vs_plain"], "+.1%"), fmt(s["vs_checks_off"], "+.1%"), fmt(s["ttft_ms"]),
             fmt(s["python_share"], ".1%"), fmt(s["python_ms_per_token"], ".3f"), fmt(s["peak_rss_mb"], ".0f"),
             fmt(s["rss_growth_mb"], ".1f")]
            for s in summary]
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="safe GGUF (default: the embedded default model)")
    ap.add_argument("--onnx", default=None, help="also the ONNX backend on this .onnx (its GGUF beside it)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", "--repeats", dest="runs", type=int, default=5, help="timed runs per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    setup = build(args)
    t0 = time.time()
    run_all(setup.configs, args.runs, args.warmup)
    summary = summarize(setup.configs)
    info = setup.info | {"tokens": args.tokens, "runs": args.runs, "n_gpu_layers": args.n_gpu_layers,
                         "wall_s": round(time.time() - t0, 1), "process_peak_rss_mb": process_peak_mb()}
    print(report(summary, info))
    if args.json:
        write_json(args.json, setup.configs, summary, info)
    if args.png:
        from .chart import overhead_chart
        overhead_chart(summary, args.png, title=f"{info['model'].rsplit('/', 1)[-1]}: {args.tokens} tokens, "
                                                 f"n_gpu_layers={args.n_gpu_layers}")
    return 0


def report(summary: list[dict], info: dict) -> str:
    head = (f"\nmodel: {info['model']}  prompt {info['prompt_tokens']} tokens, {info['tokens']} generated, greedy  "
            f"runs: {info['runs']} (median, round-robin)  threads: {info['threads']}  "
            f"n_gpu_layers: {info['n_gpu_layers']}\n")
    foot = ("\nRSS added by each load: " + ", ".join(f"{k} {v:.0f} MB" for k, v in info["load_rss_mb"].items())
            + f"; process peak {info['process_peak_rss_mb']:.0f} MB; {info['wall_s']:.0f} s of runs\n"
            f"runtime rows include its prompt formatting + tokenization, {info['prompt_prep_ms']:.2f} ms per call "
            "(the plain row is handed the same tokens ready-made)")
    refused = [s["name"] for s in summary if s["refused_runs"]]
    if refused:
        foot += "\nwarning: runs refused (shorter than asked) in: " + ", ".join(refused)
    return "\n".join([head, table(summary), foot])


def write_json(path, configs: list[Config], summary: list[dict], info: dict) -> None:
    doc = {"meta": info | {"prompt": PROMPT}, "summary": summary,
           "configs": [{"name": c.name, "group": c.group, "policy": c.policy,
                        "runs": [dataclasses.asdict(r) for r in c.runs],
                        "instrumented_run": c.profile and dataclasses.asdict(c.profile)} for c in configs]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
