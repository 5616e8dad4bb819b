"""Tiny randomly initialised models of real architectures, saved to a local folder exactly as their
full-size checkpoints are laid out: for tests and for measuring what the open-model tiers' plumbing costs
(``scripts/gpu_open_tiers.py``). No weights are downloaded; every tokenizer is built here from a word list.

Their outputs are meaningless (random weights): they prove loading, batching, caching, bundling and serving,
never accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["WORDS", "tiny_clip", "tiny_llava", "tiny_qwen2vl", "tiny_siglip", "tiny_timm"]

# The tokenizers' whole vocabulary: the prompts and the question the tests use, lower case, split on spaces.
WORDS = ("<pad> <unk> <s> </s> <image> yes no user : assistant is there roadwork in this image ? answer or . "
         "a photo of road work construction zone cones barrier street with without empty an ordinary").split()


def _tokenizer(extra_special: dict | None = None, model_max_length: int = 64, wrap: bool = False, words=WORDS):
    """A word-level fast tokenizer over WORDS; ``wrap``: add <s> ... </s> around each text (CLIP pools its text
    tower at the end-of-text token)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    if wrap:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", model_max_length=model_max_length,
                                  **({"extra_special_tokens": extra_special} if extra_special else {}))
    if extra_special:  # never split, never lower-cased
        out.add_special_tokens({"additional_special_tokens": sorted(set(extra_special.values()) - {"<image>"}) or []})
    return out


def _image_processor(cls_name: str, size: int):
    import transformers

    cls = getattr(transformers, cls_name)
    if cls_name == "CLIPImageProcessor":
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return cls(size={"height": size, "width": size})


def tiny_clip(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A 2-layer CLIPModel (vision + text towers, width 32) with a CLIPProcessor, saved to ``out``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).eval().save_pretrained(out)
    CLIPProcessor(image_processor=_image_processor("CLIPImageProcessor", image_size), tokenizer=_tokenizer(wrap=True)).save_pretrained(out)
    return Path(out)


def tiny_siglip(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A 2-layer SiglipModel with a SiglipProcessor (texts padded to 16 tokens, as SigLIP is trained), saved to ``out``."""
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor

    torch.manual_seed(seed)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
    )
    SiglipModel(cfg).eval().save_pretrained(out)
    SiglipProcessor(image_processor=_image_processor("SiglipImageProcessor", image_size),
                    tokenizer=_tokenizer(model_max_length=16)).save_pretrained(out)
    return Path(out)


LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}assistant :{% endif %}")


def tiny_llava(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A LLaVA model (2-layer CLIP vision tower + 2-layer Llama, width 32) with its LlavaProcessor and a chat
    template, saved to ``out``. 16 image tokens per image (the 4x4 patches; CLS dropped)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=image_size, patch_size=8)
    tc = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0,
                     bos_token_id=2, eos_token_id=3)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=WORDS.index("<image>"), vision_feature_layer=-1)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
    proc = LlavaProcessor(image_processor=_image_processor("CLIPImageProcessor", image_size),
                          tokenizer=_tokenizer({"image_token": "<image>"}, model_max_length=256), patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE)
    proc.save_pretrained(out)
    return Path(out)


def tiny_timm(out: str | Path, arch: str = "test_convnext", seed: int = 0, input_size: int | None = None,
              as_file: bool = False) -> Path:
    """A timm test architecture with random weights: a hub-style snapshot folder written by timm's own
    ``save_for_hf`` (config.json with pretrained_cfg + model.safetensors), or with ``as_file`` one
    ``.safetensors`` file in timm's key names. Returns the folder or file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=10)
    out = Path(out)
    if as_file:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
        return out
    from timm.models._hub import save_for_hf

    cfg = {"pretrained_cfg": {"input_size": [3, input_size, input_size]}} if input_size else None
    save_for_hf(model, str(out), model_config=cfg, safe_serialization=True)
    return out


QWEN_SPECIAL = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
QWEN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def tiny_qwen2vl(out: str | Path, seed: int = 0) -> Path:
    """A Qwen2-VL model (2-block vision transformer, 2-layer Qwen2 with multimodal RoPE, width 32) with its
    Qwen2VLProcessor, saved to ``out``. Dynamic resolution: the number of image tokens depends on the image
    size (4 to 16 here), so a batch of differently sized images is really left-padded."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    words = (*WORDS, *QWEN_SPECIAL)
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=2, eos_token_id=3),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=words.index("<|image_pad|>"), video_token_id=words.index("<|video_pad|>"),
        vision_start_token_id=words.index("<|vision_start|>"), vision_end_token_id=words.index("<|vision_end|>"))
    Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(out)
    special = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
               "vision_end_token": "<|vision_end|>"}
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2, temporal_patch_size=2)
    Qwen2VLProcessor(image_processor=ip, tokenizer=_tokenizer(special, 512, words=words), video_processor=Qwen2VLVideoProcessor(),
                     chat_template=QWEN_TEMPLATE).save_pretrained(out)
    return Path(out)
