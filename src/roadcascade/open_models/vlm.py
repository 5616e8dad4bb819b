"""Vision-language tier: a transformers image-text-to-text model (LLaVA, Qwen2-VL, Idefics3, PaliGemma, ...)
from a local path is asked one fixed question per image; the raw logit is the log-odds of "yes" against "no"
in the next-token distribution after the prompt (logsumexp over each answer's spellings). No free text is
generated.

- Batched: the processor pads on the left, so the last position of every row is the answer position.
- Shared prefix cached: the prompt puts the question before the image, so every row starts with the same
  tokens; their key/value cache is computed once and repeated over the batch. On the first batch the cached
  and uncached answers are compared and the cache is switched off when they disagree (a model whose position
  scheme the cache does not fit), or when a batch holds padding.
- Time budget: ``budget_ms`` per call of :meth:`run`; micro-batches stop once it is spent and the images left
  get logit 0 (probability 0.5, no GFLOPs counted), so a deadline never waits on the VLM.
- bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..cascade.calibration import TemperatureCalibrator, calibrated_or_sigmoid
from ..cascade.runtime import Tier, TierOutput, register_tier
from ..models.preprocess import pick_device
from .hf import as_rgb_list, count_gflops, load_pretrained
from .local import LocalSource

__all__ = ["DEFAULT_QUESTION", "VLMTier", "answer_ids"]

_logger = logging.getLogger(__name__)
DEFAULT_QUESTION = "Is there roadwork in this image? Answer yes or no."
YES, NO = ("yes", "Yes", " yes", " Yes"), ("no", "No", " no", " No")


def answer_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The first token of each spelling of an answer (unknown-token spellings dropped), deduplicated."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for w in words:
        t = tokenizer.encode(w, add_special_tokens=False)
        if t and t[0] != unk and t[0] not in ids:
            ids.append(int(t[0]))
    return ids


@register_tier
class VLMTier(Tier):
    kind = "vlm"

    def __init__(self, name: str, source: LocalSource, question: str = DEFAULT_QUESTION, prompt: str | None = None,
                 calibrator: TemperatureCalibrator | None = None, gflops: float | None = None,
                 device: torch.device | None = None, batch_size: int = 8, budget_ms: float | None = None,
                 prefix_cache: bool = True):
        if not (isinstance(question, str) and 0 < len(question) <= 500):
            raise ValueError(f"vlm tier {name!r}: question must be a string of 1..500 characters")
        if budget_ms is not None and not budget_ms > 0:
            raise ValueError(f"vlm tier {name!r}: budget_ms must be > 0 (or None: no budget), got {budget_ms}")
        self.name, self.source, self.question = name, source, question
        self.calibrator = calibrator or TemperatureCalibrator()
        self.device, self.batch_size, self.budget_ms = device or pick_device(), int(batch_size), budget_ms
        self.model, self.processor = load_pretrained(source, "AutoModelForImageTextToText", self.device, f"vlm tier {name!r}")
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # the answer position is then the last one of every row
        self.dtype = next(self.model.parameters()).dtype
        self.prompt = prompt or self._chat_prompt()
        self.yes, self.no = answer_ids(self.tokenizer, YES), answer_ids(self.tokenizer, NO)
        if not self.yes or not self.no or set(self.yes) & set(self.no):
            raise ValueError(f"vlm tier {name!r}: the tokenizer has no distinct tokens for 'yes' ({self.yes}) and 'no' ({self.no})")
        self.prefix_cache = bool(prefix_cache)
        self._prefix: tuple[torch.Tensor, object] | None = None  # (prefix ids, its key/value cache)
        self._cache_checked = False
        # transformers 5 renamed forward's past_key_values to cache (the old name still works, with a warning)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.gflops = float(gflops) if gflops is not None else self._count_gflops()

    def _chat_prompt(self) -> str:
        """The question, then the image, in the model's chat template (question first: a longer shared prefix)."""
        msgs = [{"role": "user", "content": [{"type": "text", "text": self.question}, {"type": "image"}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        tok = getattr(self.processor, "image_token", None) or "<image>"
        raise ValueError(f"vlm tier {self.name!r}: the processor at {self.source.path} has no chat template; "
                         f"give prompt=... with the image token (e.g. 'USER: {self.question} {tok} ASSISTANT:')")

    def _encode(self, images: Sequence[np.ndarray]) -> dict:
        enc = self.processor(images=as_rgb_list(images), text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def _answer(self, last: torch.Tensor) -> torch.Tensor:
        """log-odds of yes vs no from the next-token logits (n, vocab)."""
        lp = last.float().log_softmax(-1)
        return torch.logsumexp(lp[:, self.yes], -1) - torch.logsumexp(lp[:, self.no], -1)

    def _shared_prefix(self, ids: torch.Tensor) -> int:
        """Length of the token prefix every row shares, up to the first image token (0: none usable)."""
        img = getattr(self.model.config, "image_token_id", None) or getattr(self.model.config, "image_token_index", None)
        hit = (ids[0] == img).nonzero() if img is not None else []
        n = int(hit[0]) if len(hit) else 0
        return n if n > 0 and bool((ids[:, :n] == ids[:1, :n]).all()) else 0

    def _forward(self, enc: dict, use_cache: bool) -> torch.Tensor:
        ids, mask = enc["input_ids"], enc.get("attention_mask")
        n = self._shared_prefix(ids) if use_cache and (mask is None or bool(mask.all())) else 0
        if n == 0:
            return self._answer(self.model(**enc).logits[:, -1])
        if self._prefix is None or not torch.equal(self._prefix[0], ids[0, :n]):
            out = self.model(input_ids=ids[:1, :n], use_cache=True)
            self._prefix = (ids[0, :n].clone(), getattr(out, "cache", None) or out.past_key_values)
        cache = copy.deepcopy(self._prefix[1])
        cache.batch_repeat_interleave(len(ids))
        # per-token inputs (e.g. Qwen2-VL's mm_token_type_ids) lose the prefix like input_ids; the mask keeps it
        rest = {k: (v[:, n:] if v.shape[:2] == ids.shape else v) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        rest[self._cache_kw] = cache
        out = self.model(input_ids=ids[:, n:], attention_mask=mask, use_cache=True, **rest)
        return self._answer(out.logits[:, -1])

    @torch.inference_mode()
    def _batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        enc = self._encode(images)
        if not self.prefix_cache:
            return self._forward(enc, False).cpu().numpy().astype(np.float64)
        try:
            z = self._forward(enc, True)
        except (RuntimeError, ValueError, IndexError, TypeError, AttributeError) as e:  # a model the cache can't drive
            _logger.warning("vlm tier %r: prefix cache fails on %s (%s: %s); cache off", self.name,
                            type(self.model).__name__, type(e).__name__, str(e)[:200])
            self.prefix_cache, self._prefix = False, None
            return self._forward(enc, False).cpu().numpy().astype(np.float64)
        if not self._cache_checked and self._prefix is not None:
            self._cache_checked = True
            ref = self._forward(enc, False)
            tol = 0.05 if self.dtype == torch.bfloat16 else 1e-3
            if float((z - ref).abs().max()) > tol:
                _logger.warning("vlm tier %r: prefix cache changes the answers of %s (max |dz| %.3g); cache off",
                                self.name, type(self.model).__name__, float((z - ref).abs().max()))
                self.prefix_cache, self._prefix, z = False, None, ref
        return z.cpu().numpy().astype(np.float64)

    def logits(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(logit per image, answered flag per image): micro-batches stop once ``budget_ms`` is spent."""
        t0 = time.perf_counter()
        z, answered = np.zeros(len(images)), np.zeros(len(images), dtype=bool)
        for i in range(0, len(images), self.batch_size):
            if i and self.budget_ms is not None and (time.perf_counter() - t0) * 1e3 >= self.budget_ms:
                break
            z[i : i + self.batch_size] = self._batch(images[i : i + self.batch_size])
            answered[i : i + self.batch_size] = True
        return z, answered

    def _count_gflops(self) -> float:
        enc = self._encode([np.zeros((64, 64, 3), np.uint8)])
        return count_gflops(lambda: self.model(**enc))

    def run(self, images: Sequence[np.ndarray]) -> TierOutput:
        t0 = time.perf_counter()
        z, answered = self.logits(images)
        prob = np.where(answered, calibrated_or_sigmoid(self.calibrator, z), 0.5)
        # no features: the rules and fusions were fitted on val outputs without any, and must see the same shape
        return TierOutput(logits=z, prob=prob, ms=(time.perf_counter() - t0) * 1e3,
                          gflops=np.where(answered, self.gflops, 0.0))

    def full_logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Every image answered, whatever the budget (build fits on all val images)."""
        budget, self.budget_ms = self.budget_ms, None
        try:
            return self.logits(images)[0]
        finally:
            self.budget_ms = budget

    def to_config(self, bundle_dir: Path) -> dict:
        return {"kind": self.kind, "name": self.name, "source": self.source.to_dict(), "question": self.question,
                "prompt": self.prompt, "gflops": self.gflops, "batch_size": self.batch_size, "budget_ms": self.budget_ms,
                "prefix_cache": self.prefix_cache, "calibration": self.calibrator.to_dict()}

    @classmethod
    def from_config(cls, cfg: dict, bundle_dir: Path, device: torch.device) -> "VLMTier":
        return cls(name=cfg["name"], source=LocalSource.from_dict(cfg.get("source")), question=cfg["question"],
                   prompt=cfg.get("prompt"), calibrator=TemperatureCalibrator.from_dict(cfg["calibration"]),
                   gflops=cfg.get("gflops"), device=device, batch_size=cfg.get("batch_size", 8),
                   budget_ms=cfg.get("budget_ms"), prefix_cache=cfg.get("prefix_cache", True))
