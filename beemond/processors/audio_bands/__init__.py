"""The audio_bands processor."""
