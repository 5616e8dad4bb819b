"""Server settings, checked once in the constructor with messages that say what to do."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..io.images import DecodeLimits
from .protocol import ConnLimits

SPECULATE_MODES = ("auto", "on", "off")
GPU_MODES = ("auto", "on", "off")

#: Decode limits for images that arrive over HTTP: phone photos (12 MP) pass, bombs do not.
SERVE_DECODE_LIMITS = DecodeLimits(max_bytes=12 * 2**20, max_pixels=16_000_000, max_side=10_000)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the server and its batcher can be tuned with (all times in milliseconds).

    max_batch / max_wait_ms: a stage runs as soon as it holds ``max_batch`` images or its oldest image
      has waited ``max_wait_ms`` (or an image would miss its deadline by waiting longer).
    max_queue: images admitted and not yet answered, over all stages; past it the server answers 503
      with Retry-After instead of letting queues (and memory) grow.
    default_deadline_ms: deadline of a request without an ``X-Deadline-Ms`` header;
      streetvision_deadline_ms the same for ``POST /streetvision`` (validators wait 9 s).
    gpu: "auto" runs the GPU fast path when CUDA is there (JPEG bytes go to the GPU undecoded, the whole
      cascade is one batcher stage; raise max_batch to 64-256 there), "on" also without CUDA (the same
      runtime on the CPU), "off" never.
    speculate: "auto" (speculate while the measured queue depth is short), "on" or "off".
      spec_on_depth / spec_off_depth: the hysteresis band of the smoothed queue depth in images
      (speculation starts at or below ``spec_on_depth`` and stops at or above ``spec_off_depth``).
    """

    max_batch: int = 16
    max_wait_ms: float = 4.0
    max_queue: int = 128
    default_deadline_ms: float = 2000.0
    streetvision_deadline_ms: float = 8000.0
    max_deadline_ms: float = 60_000.0
    max_body_bytes: int = 16 * 2**20
    max_batch_images: int = 64
    decode_limits: DecodeLimits = field(default=SERVE_DECODE_LIMITS)
    decode_threads: int = 2
    speculate: str = "auto"
    gpu: str = "auto"  # the GPU fast path (serve/gpu_stage.py): auto (when CUDA is there) | on | off
    spec_on_depth: float = 1.0
    spec_off_depth: float = 4.0
    warmup: bool = True
    warmup_rounds: int = 2
    stats_window_s: float = 10.0
    answer_grace_ms: float = 10_000.0  # safety net: a request never waits longer than deadline + this
    max_loop_lag_ms: float = 250.0  # past this event-loop lag, refuse new requests before reading them (503)
    admit_budget_fraction: float = 0.8  # admit only if tier 0 is predicted done within this share of the time left
    conn: ConnLimits = field(default_factory=ConnLimits)  # header limits, header/body read timeouts (protocol.py)
    api_key: str | None = field(default=None, repr=False)  # required (Bearer or X-API-Key) on everything but open paths
    open_health: bool = True  # /healthz, /readyz and /metrics answer without the key
    anytime: bool = True  # answer from the tiers that ran when the deadline comes (marked X-Anytime: true); False: 503
    request_pixels: int = 100_000_000  # decoded pixels one request may hold (413 too_many_pixels past it)
    server_pixels: int = 200_000_000  # decoded pixels all requests together may hold (503 overloaded past it)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(isinstance(self.max_batch, int) and self.max_batch >= 1,
             f"max_batch must be an int >= 1 (got {self.max_batch!r}); use --max-batch 1 to turn batching off")
        need(self.max_wait_ms >= 0, f"max_wait_ms must be >= 0 (got {self.max_wait_ms!r}); 0 runs each batch with what is queued")
        need(isinstance(self.max_queue, int) and self.max_queue >= self.max_batch,
             f"max_queue ({self.max_queue!r}) must be an int >= max_batch ({self.max_batch}); raise --max-queue or lower --max-batch")
        need(0 < self.default_deadline_ms <= self.max_deadline_ms,
             f"default_deadline_ms must be in (0, max_deadline_ms={self.max_deadline_ms}] (got {self.default_deadline_ms!r})")
        need(0 < self.streetvision_deadline_ms <= self.max_deadline_ms,
             f"streetvision_deadline_ms must be in (0, max_deadline_ms={self.max_deadline_ms}] (got {self.streetvision_deadline_ms!r})")
        need(self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024 (got {self.max_body_bytes!r}); use --max-body-mb")
        need(self.max_batch_images >= 1, f"max_batch_images must be >= 1 (got {self.max_batch_images!r})")
        need(self.decode_threads >= 1, f"decode_threads must be >= 1 (got {self.decode_threads!r})")
        need(self.gpu in GPU_MODES, f"gpu must be one of {GPU_MODES} (got {self.gpu!r})")
        need(self.speculate in SPECULATE_MODES, f"speculate must be one of {SPECULATE_MODES} (got {self.speculate!r})")
        need(0 <= self.spec_on_depth <= self.spec_off_depth,
             f"need 0 <= spec_on_depth <= spec_off_depth (got {self.spec_on_depth!r}, {self.spec_off_depth!r})")
        need(self.warmup_rounds >= 1, f"warmup_rounds must be >= 1 (got {self.warmup_rounds!r})")
        need(0 < self.admit_budget_fraction <= 1, f"admit_budget_fraction must be in (0, 1] (got {self.admit_budget_fraction!r})")
        need(self.max_loop_lag_ms > 0, f"max_loop_lag_ms must be > 0 (got {self.max_loop_lag_ms!r})")
        need(self.request_pixels >= self.decode_limits.max_pixels,
             f"request_pixels ({self.request_pixels:,}) must be >= decode_limits.max_pixels ({self.decode_limits.max_pixels:,})")
        need(self.server_pixels >= self.request_pixels,
             f"server_pixels ({self.server_pixels:,}) must be >= request_pixels ({self.request_pixels:,})")
        need(self.api_key is None or (isinstance(self.api_key, str) and 16 <= len(self.api_key) <= 4096 and self.api_key.isprintable()
                                       and self.api_key.isascii()),
             "api_key must be 16..4096 printable ASCII characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        need(self.stats_window_s > 0, f"stats_window_s must be > 0 (got {self.stats_window_s!r})")
