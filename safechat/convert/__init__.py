"""Fold a trained safety artifact into a standard model file (GGUF), torch-free on this path."""
