"""Input: safe decoding, datasets, validator-style challenge views, evaluation requests, synthetic data."""
