"""Token decoders and condition encoders around the generators: the KL-16 VAE, SD-3.5's
AutoencoderKL, the binary autoencoder (BAE) of the discrete families, and the text encoders."""
