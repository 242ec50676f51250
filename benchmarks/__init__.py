"""Benchmarks of bigkernels against plain PyTorch; run `python -m benchmarks --help`.

Each family is one module of this package exposing cases(device, full) -> [Case];
harness.py holds everything they share. Add a family by adding its module and
its name here.
"""

FAMILIES = ("dense", "attention", "decode", "varlen", "rnn", "losses", "overhead", "models")
