"""The networks: the DiT and VAE wrappers (with the VAE's training objective) and the LPIPS distance."""
