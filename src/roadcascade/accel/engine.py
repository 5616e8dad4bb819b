"""A classifier tier on the device: BatchNorm folded into the convolutions, compiled, replayed as CUDA graphs
of fixed batch sizes (:class:`ClassifierEngine`: uint8 (n, 3, S, S) -> float32 logits)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..cascade.runtime import ClassifierTier
from .config import GpuConfig

__all__ = ["ClassifierEngine", "fold_batchnorm", "bucket_for"]

# ============================================================================ model preparation


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        w = conv.weight.detach().double()
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
        new_b = (bias - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
        conv.weight.copy_((w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(new_b.to(conv.bias.dtype))


def _bn_tail(bn: nn.Module) -> nn.Module:
    """What remains of a BatchNorm after folding: timm's BatchNormAct2d keeps its drop and activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d (timm's BatchNormAct2d too) into the Conv2d registered right
    before it in the same parent (how timm's EfficientNet/MobileNet blocks are laid out), in float64.

    Returns the number of folded pairs. The caller checks the folded model against the original
    (registration order is not data flow in every architecture)."""
    folded = 0
    for parent in list(model.modules()):
        prev: nn.Module | None = None
        for name, mod in list(parent._modules.items()):
            if (isinstance(mod, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d) and mod.running_mean is not None
                    and mod.affine and prev.out_channels == mod.num_features and not mod.training):
                _fold_pair(prev, mod)
                parent._modules[name] = _bn_tail(mod)
                folded += 1
                prev = None
                continue
            prev = mod
    return folded


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest graph size >= n, or None when n is larger than all."""
    for s in sizes:
        if s >= n:
            return s
    return None


class ClassifierEngine:
    """One ClassifierTier on the device: uint8 (n, 3, S, S) -> float32 logits (n,)."""

    def __init__(self, tier: ClassifierTier, device: torch.device, cfg: GpuConfig, compile_: bool,
                 log: Callable[[str], None], size: int | None = None):
        # ``size``: the input side this engine takes (default the tier's input size; a tier's square views of full
        # frames run at their own view size, on an engine of their own)
        self.tier, self.device, self.cfg, self.size = tier, device, cfg, int(size or tier.input_size)
        self.log = log
        cuda = device.type == "cuda"
        dtype = cfg.torch_dtype if cuda else torch.float32
        src = copy.deepcopy(tier.model).to(device=device, dtype=torch.float32).eval()
        model = copy.deepcopy(src)
        self.folded = 0
        if cfg.fold_bn:
            self.folded = fold_batchnorm(model)
            if self.folded and not self._same(src, model):
                log(f"{tier.name}: BatchNorm folding changed the outputs; running unfolded")
                model, self.folded = copy.deepcopy(src), 0
        del src
        self.model = model.to(dtype=dtype).to(memory_format=torch.channels_last).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dtype = dtype
        self.mean = (torch.tensor(tier.mean, dtype=torch.float32, device=device) * 255.0).view(1, 3, 1, 1)
        self.std = (torch.tensor(tier.std, dtype=torch.float32, device=device) * 255.0).view(1, 3, 1, 1)
        self.fn: Callable[[torch.Tensor], torch.Tensor] = self._forward
        self.compiled = False
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.compile_s = 0.0
        self.capture_s = 0.0
        self._want_compile = compile_ and cuda

    def _same(self, a: nn.Module, b: nn.Module) -> bool:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.rand((2, 3, self.size, self.size), generator=g).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ya, yb = a(x).double(), b(x).double()
        err = float((ya - yb).abs().max()) / max(1.0, float(ya.abs().max()))
        return err < 1e-3

    def _forward(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = (x_u8.to(torch.float32) - self.mean) / self.std  # the CPU path's normalise, in fp32
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self.model(x).float().reshape(-1)

    # -- set-up -------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compile (dynamic batch) and capture the CUDA graphs; no-op on CPU."""
        if self.device.type != "cuda":
            return
        torch.backends.cudnn.benchmark = self.cfg.cudnn_benchmark
        S = self.size
        big = max(self.cfg.graph_sizes) if self.cfg.graphs else self.cfg.chunk
        g = torch.Generator(device="cpu").manual_seed(1)
        sample = torch.randint(0, 256, (big, 3, S, S), generator=g, dtype=torch.uint8).to(self.device)
        with torch.inference_mode():
            if self._want_compile:
                t0 = time.perf_counter()
                try:
                    fn = torch.compile(self._forward, dynamic=None)
                    x = sample.clone()
                    torch._dynamo.mark_dynamic(x, 0)
                    ref = self._forward(sample[:8])
                    fn(x)
                    got = fn(sample[:8].clone())
                    torch.cuda.synchronize()
                    if not torch.allclose(got, ref, atol=0.25, rtol=0.05):
                        raise RuntimeError(f"compiled logits differ from eager: {float((got - ref).abs().max()):.4f}")
                    self.fn, self.compiled = fn, True
                except Exception as e:  # noqa: BLE001 - any compile problem: run eager (graphs still apply)
                    self.log(f"{self.tier.name}: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager")
                    self.fn, self.compiled = self._forward, False
                self.compile_s = time.perf_counter() - t0
            if self.cfg.graphs:
                t0 = time.perf_counter()
                self._capture(sample)
                self.capture_s = time.perf_counter() - t0

    def _capture(self, sample: torch.Tensor) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for b in sorted(self.cfg.graph_sizes, reverse=True):
            # cuDNN's benchmark search is slow (runtime-compiled engines): only where throughput matters
            torch.backends.cudnn.benchmark = self.cfg.cudnn_benchmark and b >= 128
            static_in = sample[:b].clone() if b <= len(sample) else sample[:1].repeat(b, 1, 1, 1)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = self.fn(static_in)
            self.graphs[b] = (graph, static_in, static_out)
        torch.cuda.synchronize(self.device)

    # -- run ------------------------------------------------------------------------------------

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) uint8 on the device -> (n,) float32 on the device (current stream)."""
        n = len(x)
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        step = self.cfg.chunk if not self.graphs else max(self.cfg.graph_sizes)
        for start in range(0, n, step):
            part = x[start:start + step]
            m = len(part)
            b = bucket_for(m, self.cfg.graph_sizes) if self.graphs else None
            if b is not None and b in self.graphs:
                graph, static_in, static_out = self.graphs[b]
                static_in[:m].copy_(part)
                graph.replay()
                out[start:start + m].copy_(static_out[:m])
            else:
                out[start:start + m].copy_(self.fn(part.contiguous()))
        return out
