"""The networks: the frozen diffusion backbone, cross-modal fusion, the segmenter, ADM taps."""
