"""Training: the CAT objective (reference and, later, fused), trainer, data and checkpoints."""
