"""The local backend: a Hugging Face image-text-to-text model run in-process (`TransformersVLM`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from annotators.cache import ResponseCache
from annotators.vlm.base import _ChatVLM, _fingerprint

log = logging.getLogger(__name__)


_VIDEO_PROCESSOR_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_vlm_processor(model_path: str) -> Any:
    """`AutoProcessor` for a chat VLM checkpoint, with the no-torchvision fallback for Qwen-VL.

    Without torchvision, transformers cannot build the Qwen2/2.5/3-VL *video* processor, so
    `AutoProcessor` fails for those checkpoints even though we only send images
    (shared/environment.md section 4). The fallback builds the checkpoint's processor class from
    its tokenizer and image processor with `video_processor=None`, skipping the class check for
    that one argument, and takes the chat template from `chat_template.jinja`/`.json` or the
    tokenizer.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_path)
    except Exception as exc:  # noqa: BLE001 - we re-raise below unless the fallback applies
        first = exc
    root = Path(model_path)
    model_type = _read_json(root / "config.json").get("model_type", "")
    cls_name = (
        _read_json(root / "processor_config.json").get("processor_class")
        or _read_json(root / "preprocessor_config.json").get("processor_class")
        or _read_json(root / "tokenizer_config.json").get("processor_class")
    )
    if model_type not in _VIDEO_PROCESSOR_FAMILIES or not cls_name or not hasattr(transformers, cls_name):
        raise first
    base = getattr(transformers, cls_name)

    def check_argument_for_proper_class(self: Any, name: str, arg: Any) -> Any:
        if name == "video_processor" and arg is None:
            return None
        return base.check_argument_for_proper_class(self, name, arg)

    cls = type(
        f"{cls_name}ImagesOnly", (base,), {"check_argument_for_proper_class": check_argument_for_proper_class}
    )
    tok = AutoTokenizer.from_pretrained(model_path)
    imgp = AutoImageProcessor.from_pretrained(model_path)
    chat = None
    if (root / "chat_template.jinja").is_file():
        chat = (root / "chat_template.jinja").read_text()
    elif (root / "chat_template.json").is_file():
        chat = _read_json(root / "chat_template.json").get("chat_template")
    chat = chat or getattr(tok, "chat_template", None)
    log.info(
        "AutoProcessor failed for %s (%s); using %s without a video processor",
        model_path,
        type(first).__name__,
        cls_name,
    )
    return cls(image_processor=imgp, tokenizer=tok, video_processor=None, chat_template=chat)


class TransformersVLM(_ChatVLM):
    """Local chat VLM through `AutoModelForImageTextToText` + the checkpoint's chat template.

    Works with LLaVA-style and Qwen2/2.5/3-VL checkpoints (see `load_vlm_processor`). Greedy
    decoding (`do_sample=False`): a verifier should be a function of its input.
    `generate_kwargs` is passed through to `generate` (e.g. a `logits_processor`). One instance
    per worker: it is not meant to be shared between threads.
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str | None = None,
        max_new_tokens: int = 128,
        batch_size: int = 4,
        cache: ResponseCache | None = None,
        draw_marks: bool = True,
        model_id: str | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cache, draw_marks)
        self.model_path = str(model_path)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generate_kwargs = dict(generate_kwargs or {})
        base = model_id or f"{Path(self.model_path).name or self.model_path}:{_fingerprint(self.model_path)}"
        self.model_id = f"transformers:{base}|max_new_tokens={max_new_tokens}|greedy"
        self.model: Any = None
        self.processor: Any = None

    def setup(self) -> None:
        """Load processor and model once (idempotent); called lazily on the first cache miss."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText

        if self.dtype is None:
            dtype = torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, self.dtype)
        self.processor = load_vlm_processor(self.model_path)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batching
        self.model = (
            AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        )
        self._dtype = dtype

    def _complete(self, batch: list[tuple[Any, str]], on_done: Callable[[int, str], None]) -> None:
        import torch

        self.setup()
        for s in range(0, len(batch), self.batch_size):
            chunk = batch[s : s + self.batch_size]
            texts = [
                self.processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for _, p in chunk
            ]
            inputs = self.processor(
                text=texts, images=[im for im, _ in chunk], return_tensors="pt", padding=True
            )
            inputs = inputs.to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, **self.generate_kwargs
                )
            self._count(len(chunk))
            new = out[:, inputs["input_ids"].shape[1] :]
            for j, text in enumerate(self.processor.batch_decode(new, skip_special_tokens=True)):
                on_done(s + j, text.strip())
