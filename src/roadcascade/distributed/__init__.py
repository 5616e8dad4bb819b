"""Running a bundle on Ray: offline labelling with Ray Data (``label.py``) and online serving with Ray Serve
(``serving.py``). Everything here goes through the public APIs (``Bundle``, ``Cascade.predict`` / ``run_stage``,
the decoders of ``roadcascade.io.images``, the native server's request parsing); Ray is imported only when used."""

import os

# No network at run time: Ray's anonymous usage statistics (sent to Anyscale) and Ray Data's usage poller (a
# driver thread querying Prometheus every 10 s, for ever) stay off unless the user turns them on explicitly.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
