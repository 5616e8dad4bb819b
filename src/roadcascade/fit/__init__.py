"""Fitting: the training loops (classifier; the detector's is in ``detect.train``), the policy optimiser, ``build``."""
