"""Inference: sampling from a trained run (generate), the prompt modes, prompt extension and
filtering, provenance of written samples, and the pixel <-> latent codec."""
