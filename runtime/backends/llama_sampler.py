"""llama.cpp's sampler chain for one generation: the safety mask first, then grammar, penalties, sampling.

The chain is llama.cpp's own (logit bias, grammar, penalties, top-k/top-p/min-p, temperature, a
seeded draw); what is ours is only the order: the safety and category tokens are masked before
anything else sees the row, so a grammar or a sampler can never pick them.
"""
from __future__ import annotations

import llama_cpp as ll

from ..errors import ParameterError
from .base import Sampling


def grammar_sampler(vocab, grammar: str):
    """llama.cpp's grammar sampler for `grammar` (GBNF with a `root` rule); ParameterError if it does not parse."""
    g = ll.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not g:
        raise ParameterError("llama.cpp could not parse the grammar (its log says where)")
    return g


def sampler_chain(vocab, n_vocab: int, masked_ids: tuple[int, ...], s: Sampling):
    """A new sampler chain (the caller frees it with llama_sampler_free) that never samples `masked_ids`."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    if masked_ids:
        n = len(masked_ids)
        bias = (ll.llama_logit_bias * n)()
        for i, tok in enumerate(masked_ids):
            bias[i].token, bias[i].bias = tok, float("-inf")
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(n_vocab, n, bias))
    if s.grammar is not None:  # after the safety mask: the grammar only ever sees ordinary tokens
        try:
            g = grammar_sampler(vocab, s.grammar)
        except ParameterError:
            ll.llama_sampler_free(chain)
            raise
        ll.llama_sampler_chain_add(chain, g)
    if s.repeat_penalty != 1.0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
            n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
    if s.greedy:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
    else:
        if s.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(s.top_k))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(s.top_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(s.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(s.temperature))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
    return chain
