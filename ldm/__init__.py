"""ldm: readable denoising diffusion and latent diffusion in PyTorch."""
