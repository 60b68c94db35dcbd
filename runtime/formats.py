"""Structured output: OpenAI's `response_format` as a llama.cpp grammar (GBNF).

The grammar itself is llama.cpp's business (its grammar sampler, in the backend's sampler chain
after the mask that keeps the safety tokens out of the answer); llama-cpp-python already turns a
JSON schema into GBNF, so this module only maps the OpenAI request shapes onto those two pieces.
"""
from __future__ import annotations

import json
from typing import Any

from .errors import ParameterError

P = "response_format"


def grammar_for(response_format: Any) -> str | None:
    """GBNF for {"type": "text" | "json_object" | "json_schema", ...}; None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ParameterError(f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema'}}, "
                             f"got {response_format!r}", param=P)
    kind = response_format["type"]
    if kind == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ParameterError("response_format json_schema needs {'json_schema': {'schema': {...}}}", param=P)
        try:
            return json_schema_to_gbnf(json.dumps(schema))
        except Exception as e:  # the converter raises plain exceptions on schemas it cannot express
            raise ParameterError(f"response_format json_schema: cannot turn the schema into a grammar: {e}",
                                 param=P) from None
    raise ParameterError(f"response_format type {kind!r} is not one of text, json_object, json_schema", param=P)
