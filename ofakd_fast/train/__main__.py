"""``python -m ofakd_fast.train`` and ``torchrun -m ofakd_fast.train``: the ofakd-train CLI."""
from .cli import main

main()
