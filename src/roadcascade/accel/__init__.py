"""Acceleration: the GPU fast path (``accel.runtime.GpuCascade``; its settings, JPEG routing, PIL-exact resize, compiled engines and decoders) and the CPU decode processes that feed it."""
