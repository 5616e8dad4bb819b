"""Open-model tiers: any timm backbone from local weights (:mod:`.timm_local`), a zero-shot CLIP/SigLIP tier
(:mod:`.zeroshot`) and a vision-language yes/no tier (:mod:`.vlm`), all loaded from local paths only.

Hugging Face hub access is switched off for this process (``HF_HUB_OFFLINE=1`` unless already set): nothing
here ever downloads, and every loader also passes ``local_files_only=True``. transformers is imported only
when a zero-shot or VLM tier is built.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
