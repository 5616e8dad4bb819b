"""Models: the zoo (timm architectures, local or packaged weights) and preprocessing."""
