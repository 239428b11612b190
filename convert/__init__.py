"""Checkpoint conversion CLI, `python -m convert` (installed with dlmjax, so it runs from any directory; the same
`main` is the `dlmjax-convert` script). The logic lives in dlmjax.checkpoint."""
