"""The BentoML inference API of DP-CXR: every answer carries the model's privacy guarantee."""
