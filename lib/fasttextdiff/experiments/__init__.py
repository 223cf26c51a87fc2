"""The paper's presets, its reproduction grid and the text ablation."""
