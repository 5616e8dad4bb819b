"""The export's settings, in a module of their own so the command line can read its defaults without importing
onnx, onnxruntime or the models."""

from __future__ import annotations

from dataclasses import dataclass

CALIBRATE_METHODS = ("minmax", "percentile", "entropy")


@dataclass
class ExportConfig:
    int8: bool = False
    data: str | None = None  # dataset whose ``val`` split calibrates and checks (default StreetWork)
    calib_images: int = 96  # val images for INT8 calibration (each seen clean and as one challenge view)
    check_images: int = 48  # other val images for the check against PyTorch (clean + one challenge view each)
    calib_max_inputs: int = 128  # network inputs per graph, evenly spaced (a square-view graph sees 3 per full frame:
    #                              231 inputs at 288 px took 56-61 s of the 2-core quickstart, 115 at 224 px 16 s)
    calibrate_method: str = "percentile"
    percentile: float = 99.999  # of each activation's histogram, for calibrate_method percentile
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: only for CPUs without VNNI, where u8*s8 can saturate
    exclude_depthwise: bool = False  # keep depthwise convolutions in fp32 (if their INT8 error costs decisions)
    stem_fp32: bool = True  # keep the convolution on the image in fp32: the largest single source of INT8 logit error
    head_fp32: bool = False  # keep the head (last conv before the global pool, and the classifier) in fp32
    opset: int = 17
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise ValueError(f"calibrate_method must be one of {', '.join(CALIBRATE_METHODS)}, got {self.calibrate_method!r}")
        if self.calib_images < 1 or self.check_images < 1 or self.calib_max_inputs < 1:
            raise ValueError("calib_images, check_images and calib_max_inputs must be >= 1")
