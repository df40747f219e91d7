"""Scaling-law sweeps: IsoFLOP grids of DiT sizes at fixed training compute, run point by point
with the existing trainer, and the fitted laws (Hoffmann et al. 2022; Besiroglu et al. 2024) that
predict the best model size, token count and loss of a larger budget (``sora-jax sweep``)."""
