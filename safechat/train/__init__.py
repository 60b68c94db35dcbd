"""Training: data assembly, [CLS] insertion, recipes and calibration for the safety signal."""
