"""Segmenting images and volumes with a saved model: the pipeline, its batched core, overlays, evaluation."""
