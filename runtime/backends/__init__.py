"""Inference backends. The decoding strategy talks only to the `Backend` interface in base.py."""
