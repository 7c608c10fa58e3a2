"""Training: the CAT objective (reference and fused modes), the trainer and its outputs, data, the latent cache,
checkpoints and config."""
