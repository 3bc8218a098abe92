"""Networks: the diffusion backbone (pixel or VAE latent) and the UNets built on it."""
