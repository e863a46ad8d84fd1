"""Training: corpus building, activation streaming, transcoder training and evaluation."""
