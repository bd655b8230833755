"""se3t: the SE(3)-Transformer on plain edge-index tensors."""
