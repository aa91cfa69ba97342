"""The benchmark's experiments beyond step times, one module each."""
