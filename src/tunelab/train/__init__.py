"""The training loop and what it needs: objectives, trainable parameters, checkpoints."""
