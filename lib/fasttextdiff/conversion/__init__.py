"""Converting outside checkpoints (OpenAI guided-diffusion / ADM) into our backbone format."""
