"""Checkpoint conversion CLI; the logic lives in dlmjax.checkpoint."""
