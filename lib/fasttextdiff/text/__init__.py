"""Report text: the encoder (tokens -> cached hidden states) and what a report says about its findings."""
