"""A tiny random-weight VLM checkpoint built offline, for tests and the demo (`build_tiny_vlm`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_TINY_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}{IMAGE}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_CORPUS = [
    'Which candidate box shows exactly the object "the red cup"? {"choice": 0, "confidence": 0.9}',
    '{"choice": null, "confidence": 0.25} {"description": "the small red mug left of the laptop"}',
    "Answer with one JSON object and nothing else. Box coordinates from 0 to 1000.",
]


def _tiny_tokenizer(special: list[str], image_tokens: dict[str, str]) -> Any:
    from transformers import Qwen2Tokenizer

    from annotators.tiny import train_byte_bpe

    vocab, merges = train_byte_bpe(_TINY_CORPUS, 500, special)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=image_tokens,
    )
    tok.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
    return tok


def _tiny_text_config(tok: Any, **extra: Any) -> dict[str, Any]:
    """The Qwen2-style text decoder both tiny architectures share: 1 layer, width 32, 2 heads."""
    return dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def build_tiny_vlm(out_dir: str | Path, arch: str = "llava", seed: int = 0) -> Path:
    """Write a tiny random-weight chat VLM checkpoint that `TransformersVLM` loads offline.

    `arch="llava"` (default): CLIP vision tower + Qwen2 text model; processor and model
    round-trip through `AutoProcessor`/`AutoModelForImageTextToText` (environment.md section 4).
    `arch="qwen2_5_vl"`: laid out like a real Qwen2.5-VL checkpoint (model, tokenizer,
    `preprocessor_config.json` naming `Qwen2_5_VLProcessor`, `chat_template.jinja`, no video
    processor), so it exercises the no-torchvision loader fallback real Qwen checkpoints need.
    """
    import torch
    import transformers as hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if arch == "llava":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
        tok = _tiny_tokenizer(special, {"image_token": "<image>"})
        imgp = hf.CLIPImageProcessor(
            size={"height": 56, "width": 56}, crop_size={"height": 56, "width": 56}, do_center_crop=False
        )
        proc = hf.LlavaProcessor(
            image_processor=imgp,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=_TINY_CHAT.replace("{IMAGE}", "<image>"),
            image_token="<image>",
        )
        cfg = hf.LlavaConfig(
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=56,
                patch_size=14,
                projection_dim=32,
            ),
            text_config=_tiny_text_config(tok, model_type="qwen2"),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
        hf.LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
        proc.save_pretrained(out)
        return out
    if arch == "qwen2_5_vl":
        special = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ]
        tok = _tiny_tokenizer(
            special,
            {
                "image_token": "<|image_pad|>",
                "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>",
                "vision_end_token": "<|vision_end|>",
            },
        )
        chat = _TINY_CHAT.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>")
        imgp = hf.Qwen2VLImageProcessor(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        )
        cfg = hf.Qwen2_5_VLConfig(
            text_config=_tiny_text_config(
                tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[0],
            ),
            image_token_id=tok.image_token_id,
            video_token_id=tok.video_token_id,
            vision_start_token_id=tok.vision_start_token_id,
            vision_end_token_id=tok.vision_end_token_id,
        )
        hf.Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(out)
        tok.save_pretrained(out)
        imgp.save_pretrained(out)
        pp = out / "preprocessor_config.json"
        data = json.loads(pp.read_text())
        data["processor_class"] = "Qwen2_5_VLProcessor"  # as in real Qwen2.5-VL checkpoints
        pp.write_text(json.dumps(data, indent=2, sort_keys=True))
        (out / "chat_template.jinja").write_text(chat)
        return out
    raise ValueError(f"unknown tiny VLM arch {arch!r} (llava | qwen2_5_vl)")
