"""`load()` and `Model.chat()`: the friendly layer over a backend and the decoding strategy."""
from __future__ import annotations

import logging
import secrets
import threading
from pathlib import Path
from typing import Any

from runtime.contract import MetadataError, SafetyMeta, verification_problem

from .backends.base import CHAT_SAMPLING, Sampling
from .errors import ContextOverflowError, ModelBusyError, ModelFileError, ParameterError
from .formats import grammar_for
from .policy import Categories, SafetyPolicy
from .prompt import answer_start, build_prompt, prompt_template, prompt_tokens, user_token_positions
from .reply import Reply
from .stops import stop_list
from .strategy import Generation, generate
from .surprisal import SurprisalError

BACKENDS = ("llama", "onnx")
log = logging.getLogger("safechat")


def _policy(safety: Any) -> SafetyPolicy | None:
    if safety is None or safety == "on":
        return SafetyPolicy()
    if safety == "off":
        return None
    if isinstance(safety, SafetyPolicy):
        return safety
    if isinstance(safety, dict):
        return SafetyPolicy(**safety)
    raise ValueError(f"safety must be 'on', 'off', a SafetyPolicy or a dict of its fields, got {safety!r}")


class Model:
    """A loaded model file with one KV cache; `chat` calls are serialised by a lock."""

    def __init__(self, path: str | Path, backend: str = "llama", n_ctx: int = 4096, n_gpu_layers: int = 0,
                 threads: int | None = None, safety: Any = "on", native: bool | None = None,
                 allow_unverified: bool = False, busy_timeout: float | None = 60.0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if native and backend != "llama":
            raise ValueError(f"the native decode loop exists for the llama backend only, not {backend!r}")
        self.policy = _policy(safety)
        if backend == "onnx":  # path is the .onnx file; its GGUF (vocabulary, template) lies beside it
            from .backends.onnx import OnnxBackend, OnnxModelFile
            self.file = OnnxModelFile(path, n_gpu_layers=n_gpu_layers, threads=threads)  # n_gpu_layers: CUDA
            make = lambda ids, cats: OnnxBackend(self.file, n_ctx=n_ctx, safety_ids=ids,  # noqa: E731
                                                 category_ids=cats)
        else:
            from .backends.llama import LlamaBackend, LlamaModelFile
            self.file = LlamaModelFile(path, n_gpu_layers=n_gpu_layers)
            make = lambda ids, cats: LlamaBackend(self.file, n_ctx=n_ctx, threads=threads,  # noqa: E731
                                                  safety_ids=ids, category_ids=cats,
                                                  reuse_prefix=True)  # a chat's next turn decodes only what is new
        self.meta: SafetyMeta | None = None
        try:
            self.meta = self.file.safety_meta()
        except MetadataError as e:
            if self.policy is not None:
                raise ModelFileError(f"{e}. Load it with safety='off' to run it without checks.") from None
        # stamped "fail" by convert, or its thresholds/cadence edited after a "pass"
        problem = verification_problem(self.file.metadata, str(self.file.path))
        if problem and not allow_unverified:
            self.file.close()
            raise ModelFileError(problem)
        if problem:
            log.warning("loading it anyway (allow_unverified=True): %s", problem)
        self.backend = make(self.meta.token_ids if self.meta else None, self.meta.category_ids if self.meta else ())
        m = self.meta
        self.categories = (Categories(m.categories, m.category_thresholds, m.controversial_threshold)
                           if m is not None and m.categories else None)
        try:
            self._check_rules(self.policy)
        except ParameterError:
            self.close()
            raise
        self.native = self._native_mode(backend, native)
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread that took the lock for the generation in progress
        self.busy_timeout = busy_timeout

    def _check_rules(self, policy: SafetyPolicy | None) -> None:
        """A policy's allow/block rules name categories this model's head has (ParameterError otherwise)."""
        if policy is None or not policy.has_category_rules:
            return
        if self.categories is None:
            raise ParameterError(f"{self.path.name} has no category head: allow/block/controversial rules need "
                                 "one (`safechat train categories ARTIFACT`, then convert)", param="safety")
        known = set(self.categories.names) - {self.categories.none}
        unknown = sorted((policy.allow | policy.block) - known)
        if unknown:
            raise ParameterError(f"unknown harm categories {unknown}; {self.path.name} has {sorted(known)}",
                                 param="safety")

    def _native_mode(self, backend: str, native: bool | None) -> bool:
        """None: the native loop where it exists; True: insist on it (a clear error if it cannot run)."""
        if native is False or backend != "llama":
            return False
        from .backends.native_loop import available, check_abi
        if native:
            check_abi()  # raises NativeLoopError naming the mismatch
            return True
        return available()

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def backend_threads(self) -> int:
        return self.backend.threads

    def tokenize_messages(self, messages: Any) -> list[int]:
        prompt = build_prompt(prompt_template(self.file), messages)
        bos = self.file.bos if self.file.add_bos else None
        return prompt_tokens(prompt, self.backend, bos)

    def user_tokens(self, messages: Any) -> tuple[list[int], list[int] | None]:
        """(the prompt's tokens, the positions of those carrying user text that the prompt surprisal rule
        scores: the first token has no context and is left out). None when the user text cannot be located
        (the rule then fails closed)."""
        prompt = build_prompt(prompt_template(self.file), messages)
        bos = self.file.bos if self.file.add_bos else None
        try:
            tokens, users = user_token_positions(prompt, self.backend, bos)
        except SurprisalError as e:
            log.warning("prompt surprisal: %s", e)
            return prompt_tokens(prompt, self.backend, bos), None
        return tokens, [p for p in users if p >= 1]

    def answer_start(self, messages: Any, tokens: list[int]) -> int:
        """Where the answer text begins in the prompt's `tokens` (a prefill is answer text: runtime/window.py)."""
        prompt = build_prompt(prompt_template(self.file), messages)
        return answer_start(prompt, tokens, self.backend, self.file.bos if self.file.add_bos else None)

    @property
    def surprisal_rule(self) -> tuple[float | None, int | None]:
        """The file's (surprisal threshold, window), each None when absent (a policy's own values override)."""
        m = self.meta
        return (m.surprisal_threshold, m.surprisal_window) if m is not None else (None, None)

    def chat(self, messages: Any, max_tokens: int = 256, temperature: float = CHAT_SAMPLING["temperature"],
             seed: int | None = None, stream: bool = False, top_k: int = CHAT_SAMPLING["top_k"],
             top_p: float = CHAT_SAMPLING["top_p"], min_p: float = CHAT_SAMPLING["min_p"],
             repeat_penalty: float = CHAT_SAMPLING["repeat_penalty"], stop: str | list[str] | None = None,
             response_format: dict | None = None, grammar: str | None = None,
             safety: Any = None) -> Reply | Generation:
        """Answer `messages` (a string or OpenAI-style list; a final assistant message is a prefill).

        Returns a `Reply`, or with `stream=True` a `Generation` that yields text pieces and
        holds the `Reply` in `.reply` when done (close it, or use `with`, to stop early).
        Sampling: temperature 0 is greedy; `seed=None` draws a fresh seed per call (a fixed seed
        repeats an answer). `stop`: up to 4 strings that end the answer (not shown).
        `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
        ...}}, as OpenAI's) or `grammar` (GBNF) constrain the answer (llama backend). `safety`
        overrides the model's policy per call. Bad values raise `ParameterError` / `MessagesError`.
        """
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ParameterError(f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
        if seed is None:
            seed = secrets.randbits(32)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise ParameterError(f"seed must be an integer or None, got {seed!r}", param="seed")
        if grammar is not None and response_format is not None:
            raise ParameterError("give either grammar or response_format, not both")
        if grammar is not None and not isinstance(grammar, str):
            raise ParameterError(f"grammar must be GBNF text, got {type(grammar).__name__}")
        grammar = grammar if grammar is not None else grammar_for(response_format)
        if grammar is not None:
            check = getattr(self.backend, "check_grammar", None)
            if check is None:
                raise ParameterError("structured output (grammar / response_format) needs the llama backend")
            check(grammar)
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed & 0xFFFFFFFF, grammar=grammar)
        stops = stop_list(stop)
        try:
            policy = self.policy if safety is None else _policy(safety)
        except (TypeError, ValueError) as e:
            raise ParameterError(f"bad safety policy: {e}", param="safety") from None
        if policy is not None and self.meta is None:
            raise ModelFileError(f"{self.path} has no safety metadata; only safety='off' can run it")
        self._check_rules(policy)
        rule = self.surprisal_rule
        s_thr = None if policy is None else (policy.surprisal_threshold if policy.surprisal_threshold is not None
                                             else rule[0])
        users = None
        if s_thr is not None and s_thr != float("inf"):  # the rule is on: locate the user's text
            tokens, users = self.user_tokens(messages)
        else:
            tokens = self.tokenize_messages(messages)
        if len(tokens) + 2 > self.backend.n_ctx:
            raise ContextOverflowError(f"the conversation is {len(tokens)} tokens; the context window holds "
                                       f"{self.backend.n_ctx}: shorten the history or load with a larger n_ctx")
        start = None
        if policy is not None:
            policy = policy.with_every(self.meta.every)  # None: the cadence the file was calibrated at
            policy = policy.with_window(self.meta.window)  # None: the file's window, else sees everything
            if policy.windowed is not None:
                start = self.answer_start(messages, tokens)
        gen = generate(self.backend, tokens, policy=policy, threshold=self.meta.threshold if self.meta else None,
                       answer_threshold=self.meta.answer_threshold if self.meta else None,
                       sampling=sampling, max_tokens=max_tokens, native=self.native, stop=stops,
                       categories=self.categories, surprisal=rule, user_positions=users, answer_start=start)
        g = Generation(self._locked(gen))
        return g if stream else g.run()

    def _locked(self, gen):
        """Run `gen` holding the model's lock, taken at the first piece and released when it ends or is
        closed. A second call from the thread that holds an open stream could never get the lock (that
        stream only moves when this thread reads it): it fails at once. Another thread waits up to
        `busy_timeout` seconds, then fails; neither ever hangs."""
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:
                gen.close()
                raise ModelBusyError(f"{self.path.name}: another stream of this model is still open in this "
                                     "thread; read it to the end or close it (gen.close(), or `with m.chat(..., "
                                     "stream=True) as gen:`) before starting a new chat")
            if not self._lock.acquire(timeout=-1 if self.busy_timeout is None else self.busy_timeout):
                gen.close()
                raise ModelBusyError(f"{self.path.name}: still busy with another generation after "
                                     f"{self.busy_timeout:g} s (one generation at a time per loaded model)")
        self._owner = me
        try:
            return (yield from gen)
        finally:
            self._owner = None
            gen.close()
            self._lock.release()

    def close(self):
        self.backend.close()
        self.file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path | None = None, backend: str = "llama", n_gpu_layers: int = 0,
         threads: int | None = None, safety: Any = "on", n_ctx: int = 4096, native: bool | None = None,
         allow_unverified: bool = False, busy_timeout: float | None = 60.0) -> Model:
    """Load a safe model file; with no path, the embedded default (built on first use).

    A file whose verification stamp says it failed (`convert quantize`/`verify --record`:
    `safety.verified=fail`), or whose `safety.threshold` / `answer_threshold` / `every` differ from
    those its stamp was measured at (edited after verification), is refused (`ModelFileError` naming
    the key and both values) unless `allow_unverified=True`, which loads it with a warning in the
    "safechat" log; an unstamped file loads.

    `native`: run the token loop in C with the GIL released (llama backend; None = when available).
    `busy_timeout`: how long a chat waits for a generation of another thread to end (None: for ever).
    """
    if path is None:
        from .default_model import default_model_path
        path = default_model_path()
    return Model(path, backend=backend, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=threads, safety=safety,
                 native=native, allow_unverified=allow_unverified, busy_timeout=busy_timeout)
