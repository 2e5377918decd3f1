"""Quality evaluation: mouth-shape accuracy, model-free audio-visual sync, and image metrics of rendered outputs."""
