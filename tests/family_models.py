"""Tiny random models of each family (a few thousand parameters), for tests of where VCE sits."""

from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=24,
              patch_size=4)  # a 6x6 grid per tile

def tiny_llava_next() -> LlavaNextConfig:
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION, projection_dim=32), text_config=LlamaConfig(**TINY_TEXT),
        image_token_id=60, image_grid_pinpoints=[[24, 48], [48, 24], [48, 48]], vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
    )

def tiny_llava_onevision() -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**VISION), text_config=Qwen2Config(**TINY_TEXT),
        image_token_id=60, video_token_id=61, image_grid_pinpoints=[[24, 48], [48, 24], [48, 48]],
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )

def tiny_qwen2_5_vl() -> Qwen2_5_VLConfig:
    """4 blocks (full attention in 1 and 3), 4-px patches, windows of 2x2 merge units."""
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1, 3],
                  in_channels=3)
    text = {**TINY_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=60, video_token_id=61,
                            vision_start_token_id=62, vision_end_token_id=63, tie_word_embeddings=False)
