"""RL for block-diffusion (SDAR) models: rows from rollouts, the extended layout, losses and objectives."""
