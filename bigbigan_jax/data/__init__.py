"""Input: data sources, preprocessing and the per-host input streams."""
