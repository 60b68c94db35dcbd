"""Benchmarks: `safechat bench overhead | memory | policies | soak` print Markdown tables."""
