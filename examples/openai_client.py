"""An OpenAI-client app pointed at the local server, streaming, showing the `safety` object.

    python -m runtime serve --api-key sk-local                 # in another terminal
    python examples/openai_client.py "How do I bake bread?"    # --base-url, --api-key, --model, --no-stream

Only the official `openai` package is needed here (pip install openai), not the runtime. The base URL
and key also come from SAFECHAT_BASE_URL / SAFECHAT_API_KEY. Output: the answer as it streams, then
`[refused: REASON]` when the safety signal intervened, then one line `safety: {...}` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def ask(client: openai.OpenAI, model: str, question: str, max_tokens: int, stream: bool, out=sys.stdout) -> dict:
    """Print the answer (streamed or whole) and return the server's `safety` object."""
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        out.write(r.choices[0].message.content)
        return r.model_extra["safety"]  # a field the OpenAI schema does not know: kept in model_extra
    safety = None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            out.write(chunk.choices[0].delta.content)
            out.flush()
        if chunk.model_extra.get("safety") is not None:  # on the chunk that carries finish_reason
            safety = chunk.model_extra["safety"]
    if safety is None:
        raise RuntimeError("the stream ended without a safety object: is this a safechat server?")
    return safety


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("question", nargs="?", default="How do I bake bread?")
    ap.add_argument("--base-url", default=os.environ.get("SAFECHAT_BASE_URL", DEFAULT_BASE_URL))
    ap.add_argument("--api-key", default=os.environ.get("SAFECHAT_API_KEY", "sk-local"),
                    help="the server's --api-key (any non-empty string when it has none)")
    ap.add_argument("--model", help="a model name from GET /v1/models (default: the server's first)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--max-retries", type=int, default=2, help="retries of a failed connection or an HTTP 503 "
                    "(server busy: the client waits for the server's Retry-After)")
    a = ap.parse_args(argv)
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=a.max_retries, timeout=120)
    try:
        model = a.model or client.models.list().data[0].id
        safety = ask(client, model, a.question, a.max_tokens, stream=not a.no_stream)
    except openai.APIConnectionError:
        print(f"\nerror: no server at {a.base_url}; start one with: python -m runtime serve", file=sys.stderr)
        return 1
    except openai.APIStatusError as e:  # the server's OpenAI-shaped error says what was wrong
        detail = e.body.get("message") if isinstance(e.body, dict) else None
        print(f"\nerror: HTTP {e.status_code}: {detail or e.message}", file=sys.stderr)
        return 1
    print()
    if safety["refused"]:
        print(f"[refused: {safety['reason']}]")
    print("safety: " + json.dumps(safety))
    return 0


if __name__ == "__main__":
    sys.exit(main())
