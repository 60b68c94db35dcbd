"""Benchmarks: `python -m bench overhead | memory | policies | soak` print Markdown tables."""
