"""Florence-2 tagger: candidate boxes for every mention of a reasoning text.

Model: transformers' native `Florence2ForConditionalGeneration` (transformers >= 4.56; real
checkpoints `florence-community/Florence-2-large`, `-base`, `-large-ft`, ... from a local path or a
hub id). The `microsoft/Florence-2-*` remote-code weights have other parameter names and do not
load into the native class (docs/formats.md, "Florence-2").

What it asks:
1. `<CAPTION_TO_PHRASE_GROUNDING>` + the mention text, one request per distinct (image, mention
   text). One request per mention rather than one per caption because the phrase labels that
   Florence-2 returns for a whole caption cannot be mapped back to overlapping or repeated
   mentions reliably; per mention, every returned box belongs to that mention.
2. `<OD>` once per image, as the fallback proposal source (`od_mode="fallback"`, default): only
   for images where at least one mention got no phrase-grounding box. Such a mention then gets
   the OD boxes whose label words all occur in the mention ("cup" for "the red cup"); when no
   label matches, it gets all OD boxes (at most `max_od_candidates`, in output order) and the
   verifier decides. `od_mode="always"` adds OD candidates for every mention this way,
   `"never"` disables OD.

Decoding choice (documented defaults): `num_beams=3`, `max_new_tokens=1024`, `do_sample=False`,
exactly the settings of the official Florence-2 examples (model card and the transformers doc).
Beam search matters for grounding: greedy decoding drops or truncates `<loc_k>` quadruples more
often. 1024 tokens is generous (a box costs 4 tokens plus its label, so a busy `<OD>` answer
of ~100 boxes fits) and the cost is only paid by outputs that are actually long: generation
stops at EOS. Lower `max_new_tokens` for throughput only if you accept truncated OD lists.
Whatever the setting, generation is bounded by the decoder's learned positions
(`text_config.max_position_embeddings`) minus its prompt (the one decoder-start token) plus one
(the last token is never fed back): past that the position lookup fails with
`IndexError: index out of range in self` (a runaway output of a real checkpoint, every output of
a tiny random one). `effective_max_new_tokens` is the bound in use.

Batching: requests are generated `batch_size` at a time (padded prompts, one image copy per
request). Outputs go through the processor's `post_process_generation`, so boxes are pixels of
the original image: `(k + 0.5) * W / 1000`, truncated to int by the native code. Decoding keeps
special tokens (otherwise the `<loc_k>` tokens vanish). Florence-2 gives no scores, so
`Candidate.score` is None.

Caching: with a `ResponseCache`, the decoded text of every request is stored under
(model id incl. decoding settings, `TAGGER_VERSION`, task prompt, image sha256); a re-run
answers from the cache and does not even load the model when everything hits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from annotators.cache import ResponseCache, cache_key
from annotators.common import Candidate, Mention, MentionLike, mention_text
from annotators.images import as_rgb, image_sha256
from annotators.prompts import TAGGER_VERSION

__all__ = ["Florence2Tagger", "Candidate", "Mention", "build_tiny_florence2", "PHRASE_TASK", "OD_TASK"]

log = logging.getLogger(__name__)

PHRASE_TASK = "<CAPTION_TO_PHRASE_GROUNDING>"
OD_TASK = "<OD>"
DEFAULT_NUM_BEAMS = 3
DEFAULT_MAX_NEW_TOKENS = 1024

_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"a", "an", "the", "of", "on", "in", "at", "to", "and", "with", "its", "this", "that"}


def _words(text: str) -> set[str]:
    out = set()
    for w in _WORD.findall(text.lower()):
        if w in _STOP:
            continue
        # crude singular: "cups" -> "cup", "boxes" -> "box"; enough for label matching
        if len(w) > 4 and w.endswith("es"):
            w = w[:-2]
        elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return out


def prompt_text(mention: str) -> str:
    """The mention as it goes into the task prompt: one line, no angle brackets.

    Angle brackets would let dataset text smuggle task or `<loc_k>` tokens into the prompt.
    """
    return " ".join(mention.replace("<", " ").replace(">", " ").split())


def label_matches(mention: str, label: str) -> bool:
    """True when every content word of the OD `label` occurs in the `mention`."""
    lw = _words(label)
    return bool(lw) and lw <= _words(mention)


def _clean_boxes(
    boxes: Sequence[Sequence[float]], labels: Sequence[str], width: int, height: int
) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Clip to the image, drop inverted boxes and exact duplicates (keeps order)."""
    out: list[tuple[str, tuple[float, float, float, float]]] = []
    seen: set[tuple[str, tuple[float, ...]]] = set()
    for box, label in zip(boxes, labels):
        if len(box) != 4:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 < x1 or y2 < y1:
            continue
        b = (x1, y1, x2, y2)
        if (label, b) in seen:
            continue
        seen.add((label, b))
        out.append((label, b))
    return out


def _config_fingerprint(model_path: str) -> str:
    cfg = Path(model_path) / "config.json"
    if cfg.is_file():
        return hashlib.sha256(cfg.read_bytes()).hexdigest()[:12]
    return "hub"


class Florence2Tagger:
    """Proposes candidate boxes per mention with Florence-2 (see the module docstring).

    `setup()` loads model and processor once per worker (the pipeline stage calls it); `tag()`
    calls it lazily when it has a cache miss. `calls` counts sequences the model generated in
    this process (0 on a fully cached re-run).
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        num_beams: int = DEFAULT_NUM_BEAMS,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int = 8,
        od_mode: Literal["fallback", "always", "never"] = "fallback",
        max_od_candidates: int = 8,
        dtype: str | None = None,
        cache: ResponseCache | None = None,
        model_id: str | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if od_mode not in ("fallback", "always", "never"):
            raise ValueError(f"od_mode must be fallback|always|never, got {od_mode!r}")
        if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("num_beams, max_new_tokens and batch_size must be >= 1")
        self.model_path = str(model_path)
        self.device = device
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.od_mode = od_mode
        self.max_od_candidates = max_od_candidates
        self.dtype = dtype
        self.cache = cache
        self.generate_kwargs = dict(generate_kwargs or {})
        base = (
            model_id
            or f"{Path(self.model_path).name or self.model_path}:{_config_fingerprint(self.model_path)}"
        )
        self.model_id = f"florence2:{base}|beams={num_beams}|max_new_tokens={max_new_tokens}"
        self.model: Any = None
        self.processor: Any = None
        self.calls = 0

    # ------------------------------------------------------------------ loading
    def setup(self) -> None:
        """Load processor and model (idempotent)."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        if self.dtype is None:
            dtype = torch.float16 if str(self.device).startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, self.dtype)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        model = Florence2ForConditionalGeneration.from_pretrained(self.model_path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self._torch_dtype = dtype
        self._position_limit = decoder_token_budget(self.model.config)

    @property
    def effective_max_new_tokens(self) -> int:
        """`max_new_tokens`, capped by the decoder's position budget once the model is loaded."""
        limit = getattr(self, "_position_limit", None)
        return self.max_new_tokens if limit is None else min(self.max_new_tokens, limit)

    def provenance(self) -> dict[str, Any]:
        """What produced the candidates, for the manifest and the audit."""
        return {
            "tagger": "florence2",
            "model_id": self.model_id,
            "tagger_version": TAGGER_VERSION,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "od_mode": self.od_mode,
        }

    # ------------------------------------------------------------------ generation
    def _generate(self, requests: list[tuple[Any, str]]) -> list[str]:
        """Decoded raw outputs (special tokens kept) for (PIL image, task prompt) requests."""
        import torch

        self.setup()
        texts: list[str] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i : i + self.batch_size]
            inputs = self.processor(
                text=[p for _, p in chunk], images=[im for im, _ in chunk], return_tensors="pt", padding=True
            )
            inputs = inputs.to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self._torch_dtype)
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=self.effective_max_new_tokens,
                    num_beams=self.num_beams,
                    do_sample=False,
                    **self.generate_kwargs,
                )
            self.calls += len(chunk)
            texts.extend(self.processor.batch_decode(out, skip_special_tokens=False))
        return texts

    def _raw_outputs(self, requests: list[tuple[Any, str, str]]) -> list[str]:
        """Raw text per (image, image sha, prompt), from the cache or the model (misses only)."""
        results: list[str | None] = [None] * len(requests)
        keys: list[str] = []
        todo: list[int] = []
        for i, (_, sha, prompt) in enumerate(requests):
            key = cache_key(self.model_id, TAGGER_VERSION, prompt, sha)
            keys.append(key)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                results[i] = json.loads(hit)["text"]
        if todo:
            # Cache per batch as it finishes, so an interrupted run keeps its finished calls.
            for j in range(0, len(todo), self.batch_size):
                idx = todo[j : j + self.batch_size]
                texts = self._generate([(requests[i][0], requests[i][2]) for i in idx])
                for i, text in zip(idx, texts):
                    results[i] = text
                    if self.cache is not None:
                        self.cache.put(
                            keys[i],
                            json.dumps({"text": text}),
                            model_id=self.model_id,
                            prompt_version=TAGGER_VERSION,
                        )
        return [r if r is not None else "" for r in results]

    def _parse(self, text: str, task: str, size: tuple[int, int]) -> dict[str, Any]:
        if self.processor is None:
            # Fully cached: parsing needs only the processor, which is cheap to load.
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(self.model_path)
        parsed = self.processor.post_process_generation(text, task=task, image_size=size)[task]
        return parsed if isinstance(parsed, dict) else {"bboxes": [], "labels": []}

    # ------------------------------------------------------------------ public
    def tag(self, images: Sequence[Any], mentions: Sequence[Sequence[MentionLike]]) -> list[list[Candidate]]:
        """Candidates for every mention of every image.

        `images[i]` is a PIL image or uint8 array; `mentions[i]` the mentions (str or `Mention`)
        of that image. Returns, per image, a flat list of candidates in mention order; each
        candidate carries its mention text and `mention_index`. A mention can get zero candidates.
        """
        if len(images) != len(mentions):
            raise ValueError(f"{len(images)} images but {len(mentions)} mention lists")
        rgb = [as_rgb(im) for im in images]
        shas = [image_sha256(im) for im in rgb]

        # 1. phrase grounding, one request per distinct (image, mention text)
        req_index: dict[tuple[int, str], int] = {}
        requests: list[tuple[Any, str, str]] = []
        for i, ms in enumerate(mentions):
            for m in ms:
                text = prompt_text(mention_text(m))
                if not text or (i, text) in req_index:
                    continue
                req_index[(i, text)] = len(requests)
                requests.append((rgb[i], shas[i], PHRASE_TASK + text))
        raws = self._raw_outputs(requests)
        grounded: dict[tuple[int, str], list[tuple[str, tuple[float, float, float, float]]]] = {}
        for (i, text), r in req_index.items():
            p = self._parse(raws[r], PHRASE_TASK, rgb[i].size)
            grounded[(i, text)] = _clean_boxes(p.get("bboxes", []), p.get("labels", []), *rgb[i].size)

        # 2. OD where needed
        need_od: list[int] = []
        for i, ms in enumerate(mentions):
            if self.od_mode == "always" and ms:
                need_od.append(i)
            elif self.od_mode == "fallback":
                if any(not grounded.get((i, prompt_text(mention_text(m))), []) for m in ms):
                    need_od.append(i)
        od: dict[int, list[tuple[str, tuple[float, float, float, float]]]] = {}
        if need_od:
            od_raws = self._raw_outputs([(rgb[i], shas[i], OD_TASK) for i in need_od])
            for i, r in zip(need_od, od_raws):
                p = self._parse(r, OD_TASK, rgb[i].size)
                od[i] = _clean_boxes(p.get("bboxes", []), p.get("labels", []), *rgb[i].size)

        # 3. assemble
        out: list[list[Candidate]] = []
        for i, ms in enumerate(mentions):
            cands: list[Candidate] = []
            for k, m in enumerate(ms):
                raw_text = mention_text(m)
                text = prompt_text(raw_text)
                pg = grounded.get((i, text), [])
                for label, box in pg:
                    cands.append(Candidate(raw_text, label, box, "phrase_grounding", None, k))
                if i in od and (self.od_mode == "always" or not pg):
                    matched = [(lb, b) for lb, b in od[i] if label_matches(text, lb)]
                    pool = matched or od[i][: self.max_od_candidates]
                    for label, box in pool[: self.max_od_candidates]:
                        cands.append(Candidate(raw_text, label, box, "od", None, k))
            out.append(cands)
        return out


DECODER_PROMPT_TOKENS = 1  # Florence-2 decoding starts from decoder_start_token_id alone


def decoder_token_budget(config: Any) -> int | None:
    """How many new tokens the BART decoder of a Florence-2 config can generate, or None if unknown.

    Generated sequence = decoder prompt + new tokens; every token but the last is fed back at its
    position, and positions stop at `max_position_embeddings` (BART's learned table).
    """
    text = getattr(config, "text_config", config)
    n = getattr(text, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= DECODER_PROMPT_TOKENS:
        return None
    return n - DECODER_PROMPT_TOKENS + 1


# ---------------------------------------------------------------------- tiny checkpoint
def build_tiny_florence2(out_dir: str | Path, seed: int = 0, image_size: int = 64) -> Path:
    """Write a tiny random-weight native Florence-2 checkpoint (model + processor) to `out_dir`.

    Built offline from configs (docs/formats.md, "Environment notes"): a byte-level BPE tokenizer
    trained on a few phrases with BART's special-token ids, the 1000 `<loc_k>` tokens as single
    tokens, a 2-stage DaViT and a 1+1-layer BART. It loads with `AutoProcessor` and
    `Florence2ForConditionalGeneration.from_pretrained` like a real checkpoint, so tests run the
    real processor, generate and post-processing code.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        RobertaTokenizer,
    )

    from annotators.tiny import train_byte_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = [
        "a red cup on the table",
        "the chair left of the lamp",
        "locate the phrases in the caption",
        "locate the objects with category name in the image.",
        "what does the image describe?",
        "box bottle mug laptop sofa shelf",
    ]
    vocab, merges = train_byte_bpe(corpus, 400, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # BART ids 0..4
    tok = RobertaTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens(
        {
            "extra_special_tokens": ["<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>"]
            + [f"<loc_{i}>" for i in range(1000)]
        },
        replace_extra_special_tokens=False,
    )
    tok.add_tokens(["<image>"], special_tokens=True)
    imgp = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    imgp.image_seq_length = (image_size // 8) ** 2 + 1  # vision strides 4*2 = 8, +1 pooled token
    parse_tasks = [
        "ocr",
        "phrase_grounding",
        "pure_text",
        "description_with_bboxes",
        "description_with_polygons",
        "polygons",
        "bboxes",
        "description_with_bboxes_or_polygons",
    ]
    proc = Florence2Processor(
        image_processor=imgp, tokenizer=tok, post_processor_config={k: {} for k in parse_tasks}
    )
    cfg = Florence2Config(
        text_config=dict(
            model_type="bart",
            vocab_size=len(tok),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=256,
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        vision_config=dict(
            depths=[1, 1],
            patch_size=[7, 3],
            patch_stride=[4, 2],
            patch_padding=[3, 1],
            patch_prenorm=[False, True],
            embed_dim=[16, 32],
            num_heads=[1, 2],
            num_groups=[1, 2],
            window_size=4,
            projection_dim=32,
            drop_path_rate=0.0,
        ),
        image_token_id=tok.image_token_id,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out
