"""dlmjax: diffusion language models in JAX."""
