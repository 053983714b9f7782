"""Training: the ABFT/E2E objectives, the trainable set, the trainer, callbacks, run folders."""
