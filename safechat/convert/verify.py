"""`safechat verify`: does a (converted, quantized, exported) model file behave like the torch
model of its weights?

For every prompt of a fixed, versioned set (`verify_prompts_v2.json`, 100 prompts: benign,
benign-but-dangerous-sounding, harmful, harmful with an assistant prefill; `verify_prompts_v1.json`,
its first 24, is kept for reproducing older figures) the prompt is tokenized the runtime's way
(chat template from the model file, user text without special parsing), then:

* MODEL runs through the runtime's own backend (llama.cpp for a GGUF, onnxruntime for an .onnx
  from `convert onnx`): the end-of-prompt side [CLS] check gives p_unsafe, then N greedy tokens
  (the three safety ids masked, as in the runtime);
* the reference is the transformers model of REF's weights (dequantized to float32,
  `safechat/convert/hf_reference.py`, any family the importer knows): the same greedy continuation (safety
  ids masked) and p_unsafe of the side tokens + [CLS] decoded after the prompt, scored by REF's
  own safe/unsafe rows.

Metrics per model: next-token agreement (the fraction of the first N greedy tokens that match
before the first divergence, averaged over prompts), mean and max |delta p_unsafe| and verdict
agreement over the checks MODEL acts on: the end-of-prompt check at its calibrated threshold
(`safety.threshold`) and, when its answer threshold lets checks inside the answer act (finite, or
absent: one threshold for every check), a check every `safety.every` tokens (the file's calibrated
cadence, else the runtime's default) of MODEL's own greedy answer at that threshold, the same answer
tokens teacher-forced into the reference.
The bar (issue 4): verdict agreement >= 99% and mean |delta p_unsafe| <= 0.02 (on v2's 100
prompts one flipped verdict is 0.99, on v1's 24 it is 0.958). The margin: how many reference
verdicts lie within 0.01 of their threshold (`near_threshold`), the checks a precision change can
flip; a calibration that leaves that band nearly empty passes the bar with room to spare.

Exact agreement is not expected even for the same weights: llama.cpp keeps K/V in F16 and
quantizes activations (to Q8) for quantized matmuls, while the reference runs in float32.
torch and transformers are imported only here, lazily.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf

from runtime.contract import DEFAULT_SURPRISAL_WINDOW, PREFIX, MetadataError, SafetyMeta
from runtime.backends.base import Sampling
from runtime.errors import ModelFileError
from runtime.gguf_io import ConvertError
from runtime.prompt import build_prompt, prompt_tokens
from runtime.strategy import SafetyPolicy

PROMPTS_V1 = Path(__file__).with_name("verify_prompts_v1.json")
PROMPTS = Path(__file__).with_name("verify_prompts_v2.json")   # the default
BAR_VERDICT, BAR_MEAN_DP = 0.99, 0.02
BAR = {"verdict_agreement": BAR_VERDICT, "mean_abs_dp": BAR_MEAN_DP}
NEAR = 0.01  # a reference p_unsafe this close to its threshold is a verdict a rounding can flip (`near_threshold`)


class VerifyError(RuntimeError):
    pass


def answer_every(meta) -> int:
    """Tokens between the checks inside an answer that verify compares: the cadence the runtime uses for this
    file by default (its own `safety.every`, else the runtime's default)."""
    return SafetyPolicy().with_every(meta.every).every


def load_prompts(path: str | Path = PROMPTS) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise VerifyError(f"cannot read the prompt set {path}: {e}") from None
    if not d.get("prompts"):
        raise VerifyError(f"{path} holds no prompts")
    return d


def _import_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise VerifyError("verification needs torch and transformers for the reference model: pip install -e "
                          "'.[train]' (or, for quantize/onnx/gguf --quant, --no-verify: the file is written without "
                          "a stamp)") from None
    return torch


# -- the torch reference -----------------------------------------------------------------------

class TorchReference:
    """Greedy continuation and p_unsafe from the transformers model of REF's weights (safechat/convert/hf_reference.py).

    A check is what the runtime decodes: the side tokens ending in the [CLS] after the tokens so far,
    scored by the safe/unsafe logits, on a copy of the key/value cache (the answer never sees it).
    """

    def __init__(self, path: str | Path):
        from .hf_reference import reference_model

        self.torch = _import_torch()
        self.path = Path(path)
        try:
            self.m, self.facts = reference_model(self.path)
        except (ConvertError, ValueError, KeyError) as e:
            raise VerifyError(f"cannot load the reference {self.path} in transformers: {e}") from None
        self.n_vocab = int(self.m.config.vocab_size)
        f = gguf.GGUFReader(str(self.path)).fields
        kv = {k: str(v.contents()) for k, v in f.items() if k.startswith(PREFIX)}
        try:
            meta = SafetyMeta.from_kv(kv, self.n_vocab, where=f"the reference {self.path}")
        except MetadataError as e:
            raise VerifyError(str(e)) from None
        self.ids = meta.token_ids                  # (*side, cls, safe, unsafe)
        self.side = list(self.ids[:-2])            # what a check decodes
        cats = tuple(meta.category_token_ids or ()) + ((meta.controversial_token_id,)
                                                         if meta.controversial_token_id is not None else ())
        self.masked = list(self.ids) + list(cats)  # never sampled, as in the runtime

    def _forward(self, tokens: list[int], cache):
        return self.m(self.torch.tensor([tokens]), cache=cache, use_cache=True)

    def _check(self, cache) -> float:
        import copy

        logits = self._forward(self.side, copy.deepcopy(cache)).logits[0, -1]
        return float(self.torch.softmax(logits[list(self.ids[-2:])].double(), -1)[1])

    def _argmax(self, logits) -> int:
        logits = logits.clone()
        logits[self.masked] = -math.inf
        return int(logits.argmax())

    def run(self, tokens: list[int], n_new: int, is_eog) -> tuple[float, list[int]]:
        from transformers import DynamicCache

        with self.torch.no_grad():
            cache = DynamicCache(config=self.m.config)
            logits = self._forward(tokens, cache).logits[0, -1]
            p_unsafe = self._check(cache)
            out, nxt = [], self._argmax(logits)
            for step in range(n_new):
                out.append(nxt)
                if is_eog(nxt) or step == n_new - 1:
                    break
                nxt = self._argmax(self._forward([nxt], cache).logits[0, -1])
        return p_unsafe, out

    def answer_verdicts(self, tokens: list[int], answer: list[int], covered: list[int]) -> list[float]:
        """p_unsafe of a [CLS] after the prompt plus the first c answer tokens, for each c in `covered`."""
        from transformers import DynamicCache

        found = {}
        with self.torch.no_grad():
            cache, done = DynamicCache(config=self.m.config), 0
            self._forward(tokens, cache)
            for c in sorted(set(covered)):
                if c > done:
                    self._forward(answer[done:c], cache)
                    done = c
                found[c] = self._check(cache)
        return [found[c] for c in covered]


# -- llama.cpp (the runtime's path) ------------------------------------------------------------

def _llama_run(backend, tokens: list[int], n_new: int, is_eog,
               every: int = 0) -> tuple[float, list[int], list[tuple[int, float]]]:
    """End-of-prompt p_unsafe, the greedy answer, and [(tokens covered, p_unsafe)] every `every` tokens."""
    p = backend.start(tokens, Sampling(), check=True)
    out, checks = [], []
    for step in range(n_new):
        t = backend.sample()
        out.append(t)
        if is_eog(t) or step == n_new - 1:
            break
        q = backend.advance(t, check=bool(every) and (step + 1) % every == 0)
        if q is not None:
            checks.append((step + 1, float(q)))
    return float(p), out, checks


def _agreement(a: list[int], b: list[int], n: int) -> float:
    if a == b:
        return 1.0
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k / n


def _file_facts(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t.tensor_type.name for t in r.tensors}
    counts: dict[str, int] = {}
    for v in tensors.values():
        counts[v] = counts.get(v, 0) + 1
    main = max((k for k in counts if k not in ("F32",)), key=lambda k: counts[k], default="F32")
    return {"weights": main, "embedding": tensors.get("token_embd.weight"),
            "output": tensors.get("output.weight"), "tensor_types": counts}


@dataclass
class ModelResult:
    model: str
    reference: str
    weights: str
    embedding: str
    n_prompts: int
    n_tokens: int
    threshold: float
    token_agreement: float
    mean_abs_dp: float
    max_abs_dp: float
    verdict_agreement: float
    passed: bool
    by_kind: dict = field(default_factory=dict)
    prompts: list = field(default_factory=list)
    seconds: float = 0.0
    answer_threshold: float | None = None  # None: the answer is not checked (its checks cannot act)
    n_checks: int = 0                        # checks compared: one per prompt plus those inside answers
    near_threshold: int = 0                  # of those, reference p_unsafe within NEAR of the check's threshold
    every: int = 0                           # tokens between the answer checks compared (0: none compared)
    surprisal: tuple[float | None, int] = (None, 8)  # the file's surprisal rule (threshold, None: off; window):
                                                     # recorded in the stamp so that an edit is caught
    window: tuple[int, int, int] | None = None  # the file's safety.window, recorded likewise (the answer checks
                                                # compared here see everything: the windowed ones are not yet)


def _open(model: Path, threads: int | None):
    """(model file, backend, safety meta, facts) for a GGUF (llama.cpp) or an .onnx (onnxruntime)."""

    mf = None
    try:
        if model.suffix == ".onnx":
            from runtime.backends.onnx import OnnxBackend, OnnxModelFile
            mf = OnnxModelFile(model, threads=threads)
            meta = mf.safety_meta()
            # layer weights as exported/quantized; embedding, output projection and head stay float32
            facts = {"weights": f"onnx {mf.props.get('safechat.quant', 'fp32')}", "head": "F32"}
            return mf, OnnxBackend(mf, n_ctx=1024, safety_ids=meta.token_ids), meta, facts
        from runtime.backends.llama import LlamaBackend, LlamaModelFile
        mf = LlamaModelFile(model)
        meta = mf.safety_meta()
        f = _file_facts(model)
        facts = {"weights": f["weights"], "head": f["output"] or f["embedding"]}
        return mf, LlamaBackend(mf, n_ctx=1024, threads=threads, safety_ids=meta.token_ids), meta, facts
    except (ModelFileError, MetadataError) as e:
        if mf is not None:
            mf.close()
        raise VerifyError(str(e)) from None


def verify_model(model: str | Path, ref: TorchReference, prompt_set: dict, n_tokens: int = 32,
                 threads: int | None = None, ref_cache: dict | None = None, log=None) -> ModelResult:

    model = Path(model)
    t0 = time.perf_counter()
    mf, backend, meta, facts = _open(model, threads)
    if meta.token_ids != ref.ids or mf.n_vocab != ref.n_vocab:
        backend.close()
        mf.close()
        raise VerifyError(f"{model} has safety token ids {meta.token_ids} and {mf.n_vocab} tokens; the reference "
                          f"{ref.path.name} has {ref.ids} and {ref.n_vocab}: not the same model")
    bos = mf.bos if mf.add_bos else None
    answer_thr = meta.threshold if meta.answer_threshold is None else meta.answer_threshold
    every = answer_every(meta) if math.isfinite(answer_thr) else 0   # checks inside answers act: verify them
    rows = []
    ref_cache = {} if ref_cache is None else ref_cache
    try:
        # every prompt through the model first, then the reference: interleaved, the idle threads of
        # torch and of the model's runtime spin against each other (measured: 1 ms -> 85 ms per decode)
        runs = []
        for pr in prompt_set["prompts"]:
            toks = prompt_tokens(build_prompt(mf.chat_template, pr["messages"]), mf, bos)
            runs.append((pr, toks, *_llama_run(backend, toks, n_tokens, mf.is_eog, every)))
        for pr, toks, p_m, out_m, checks in runs:
            key = (tuple(toks), n_tokens)
            if key not in ref_cache:
                ref_cache[key] = ref.run(toks, n_tokens, mf.is_eog)
            p_r, out_r = ref_cache[key]
            along = ref.answer_verdicts(toks, out_m, [c for c, _ in checks])
            rows.append({"id": pr["id"], "kind": pr["kind"], "prompt_tokens": len(toks),
                         "p_unsafe": p_m, "p_unsafe_ref": p_r, "abs_dp": abs(p_m - p_r),
                         "verdict": p_m >= meta.threshold, "verdict_ref": p_r >= meta.threshold,
                         "answer_checks": [[c, q, q_r] for (c, q), q_r in zip(checks, along)],
                         "agreement": _agreement(out_m, out_r, n_tokens),
                         "tokens": out_m, "tokens_ref": out_r})
            if log:
                log(f"  {pr['id']:<12} p={p_m:.3f} ref={p_r:.3f} agree={rows[-1]['agreement']:.2f}")
    finally:
        backend.close()
        mf.close()

    def agg(rs):
        # every check the file acts on: (p_unsafe, reference p_unsafe, its threshold)
        cs = [(r["p_unsafe"], r["p_unsafe_ref"], meta.threshold) for r in rs] + \
             [(q, q_r, answer_thr) for r in rs for _, q, q_r in r["answer_checks"]]
        return {"n": len(rs), "n_checks": len(cs),
                "token_agreement": sum(r["agreement"] for r in rs) / len(rs),
                "mean_abs_dp": sum(abs(q - q_r) for q, q_r, _ in cs) / len(cs),
                "max_abs_dp": max(abs(q - q_r) for q, q_r, _ in cs),
                "verdict_agreement": sum((q >= t) == (q_r >= t) for q, q_r, t in cs) / len(cs),
                "near_threshold": sum(abs(q_r - t) < NEAR for _, q_r, t in cs)}

    a = agg(rows)
    kinds = {}
    for r in rows:
        kinds.setdefault(r["kind"], []).append(r)
    ok = a["verdict_agreement"] >= BAR_VERDICT and a["mean_abs_dp"] <= BAR_MEAN_DP
    return ModelResult(str(model), str(ref.path), facts["weights"], facts["head"],
                       a["n"], n_tokens, meta.threshold, a["token_agreement"], a["mean_abs_dp"], a["max_abs_dp"],
                       a["verdict_agreement"], ok, {k: agg(v) for k, v in kinds.items()}, rows,
                       round(time.perf_counter() - t0, 1), answer_thr if every else None, a["n_checks"],
                       a["near_threshold"], every, surprisal_rule(meta), window=meta.window)


def surprisal_rule(meta) -> tuple[float | None, int]:
    """(the file's surprisal threshold, None when off; its window, the default when absent)."""
    thr = meta.surprisal_threshold
    window = meta.surprisal_window or DEFAULT_SURPRISAL_WINDOW
    return (None if thr is None or math.isinf(thr) else thr), window


def markdown(results: list[ModelResult]) -> str:
    lines = ["| model | weights | head rows | next-token agreement | mean abs dp | max abs dp | "
             "verdict agreement | bar |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {Path(r.model).name} | {r.weights} | {r.embedding} | {r.token_agreement:.3f} | "
                     f"{r.mean_abs_dp:.4f} | {r.max_abs_dp:.4f} | {r.verdict_agreement:.3f} | "
                     f"{'pass' if r.passed else 'FAIL'} |")
    return "\n".join(lines)


def _own_weights(model: Path) -> Path:
    """The GGUF holding a model's own weights: itself, or for an .onnx the safe GGUF beside it."""
    if model.suffix != ".onnx":
        return model
    gguf_path = model.with_suffix(".gguf")
    if not gguf_path.is_file():
        raise VerifyError(f"{model}: pass --reference (the safe GGUF it was exported from); {gguf_path.name} "
                          "is not beside it")
    return gguf_path


def run_verify(models: list[str | Path], reference: str | Path | None = None, n_tokens: int = 32,
               prompts: str | Path = PROMPTS, threads: int | None = None, log=None) -> tuple[list[ModelResult], dict]:
    """Verify each model (GGUF or .onnx) against the torch model of `reference` (default: the model's
    own weights: the file itself, or the GGUF an .onnx was exported from)."""
    ps = load_prompts(prompts)
    for m in models:
        if not Path(m).is_file():
            raise VerifyError(f"model file not found: {m}")
    if reference is not None and not Path(reference).is_file():
        raise VerifyError(f"reference file not found: {reference}")
    results, refs = [], {}
    for m in models:
        rp = Path(reference) if reference is not None else _own_weights(Path(m))
        if rp not in refs:
            if log:
                log(f"loading the torch reference {rp}")
            refs[rp] = (TorchReference(rp), {})
        ref, cache = refs[rp]
        if log:
            log(f"verifying {m} against {rp}")
        results.append(verify_model(m, ref, ps, n_tokens, threads, cache, log))
    summary = {"prompt_set": {"name": ps.get("name"), "version": ps.get("version"), "n": len(ps["prompts"])},
               "bar": dict(BAR),
               "tokens": n_tokens, "passed": all(r.passed for r in results),
               "results": [asdict(r) for r in results]}
    return results, summary
