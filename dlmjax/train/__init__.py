"""Training: objectives (MDLM, BD3LM, TRIMS), the sharded step, mesh rules, optimizer, LoRA, train-state checkpoints."""
