"""Synthetic dashcam roadwork: objects pasted into real training frames (see ``engine``)."""

from .engine import SYNTH_SOURCE, SynthConfig, ensure_synth, load_banks, synth_one, synthesize

__all__ = ["SYNTH_SOURCE", "SynthConfig", "ensure_synth", "load_banks", "synth_one", "synthesize"]
