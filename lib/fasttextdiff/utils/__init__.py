"""Small shared pieces: atomic files, errors, process defaults, devices, checkpoints, metrics, curves."""
