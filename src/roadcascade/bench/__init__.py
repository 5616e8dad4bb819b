"""Measurement: evaluation, metrics reports, the load generator and the serving benchmark."""
