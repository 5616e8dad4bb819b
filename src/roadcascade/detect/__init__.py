"""Detection: a traffic-cone detector (torchvision FCOS on a zoo backbone), its cascade tier, and an
optional COCO context tier (YOLOX-Nano through onnxruntime). See docs/DETECTION.md."""
