"""roadcascade: is there roadwork in this street image? Fast, calibrated, cheap."""

__version__ = "0.1.0"
