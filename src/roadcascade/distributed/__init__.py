"""Running a bundle on Ray: offline labelling with Ray Data (``label.py``) and online serving with Ray Serve
(``serving.py``). Everything here goes through the public APIs (``Bundle``, ``Cascade.predict`` / ``run_stage``,
the decoders of ``roadcascade.images``, the native server's request parsing); Ray is imported only when used."""
