"""Tokenizer and chat format of GR3D.

- The tiny preset's tokenizer is a byte-level BPE trained offline (no hub) on grammar-like text, wrapped as a
  transformers `Qwen2Tokenizer`, so it has Qwen2's pre-tokenizer: every digit is its own pre-token, which
  makes numbers learnable digit by digit (as with Qwen2-7B's real tokenizer).
- The grammar's tags (`schemas.grammar.SPECIAL_TOKENS`), `<image>` and the chat tokens are single ids.
  `add_gr3d_tokens` adds them to any Qwen2 tokenizer (e.g. NVILA-Lite's `llm/` one).
- Chat format is NVILA's qwen2 template: `<|im_start|>{role}\\n{content}<|im_end|>\\n`, default system
  prompt "You are a helpful assistant". `encode_conversation` builds input ids and labels piece by piece so
  the supervised span is exact: assistant content plus its `<|im_end|>`, never the prompt, the image slots or
  a `<region>` slot. Each `<region>` also yields its box (parsed with the schemas grammar) in order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import grammar

__all__ = [
    "IMAGE_TOKEN", "IM_START", "IM_END", "ENDOFTEXT", "DEFAULT_SYSTEM", "CHAT_TEMPLATE", "IGNORE_INDEX",
    "gr3d_special_tokens", "tokenizer_corpus", "build_tiny_tokenizer", "add_gr3d_tokens", "gr3d_token_ids",
    "load_tokenizer", "EncodedConversation", "encode_conversation", "encode_prompt", "normalize_turns",
]

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant"
IGNORE_INDEX = -100

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""NVILA's qwen2 chat template (string content only); `encode_conversation` reproduces it token for token."""

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def gr3d_special_tokens() -> list[str]:
    """Every string the GR3D tokenizer keeps as one id: chat tokens, `<image>`, the grammar's tags."""
    out = [ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN]
    out += [t for t in grammar.SPECIAL_TOKENS if t not in out]
    return out


# ---------------------------------------------------------------------------------------------- corpus

_CATEGORIES = ["chair", "table", "sofa", "bed", "lamp", "cabinet", "shelf", "box", "bottle", "cup", "monitor",
               "door", "window", "car", "pedestrian", "cyclist", "truck", "plant", "bin", "desk", "pillow"]
_PROMPTS = [
    "What is the 3D box of {g}?", "Detect the 3D box of the {c}.", "Detect the 3D bounding boxes of all {c}s.",
    "Please detect the 3D location of point {g}.", "Where is the {c} in the image?",
    "Is the {c} {g} left of the {c2} {g2}?", "How far is the {c} from the camera?",
    "Detect the 3D bounding boxes of all objects.", "Which object is closer to the camera?",
]
_SENTENCES = [
    "The {c} {g} is on the left of the {c2} {g2}.", "The {c} is at {g} and it is {d} meters away.",
    "First I find the {c} {g}, then the {c2} {g2}. The distance is {d} meters.",
    "Yes, the {c} is closer than the {c2}.", "No, it is behind the {c2}.", "The answer is {d}.",
]


def _rand_box(rng: random.Random) -> tuple[float, float, float, float]:
    x1, x2 = sorted(rng.random() for _ in range(2))
    y1, y2 = sorted(rng.random() for _ in range(2))
    return x1, y1, x2, y2


def _rand_box3d(rng: random.Random) -> grammar.Box3D:
    return grammar.Box3D((rng.uniform(-5, 5), rng.uniform(-2, 2), rng.uniform(0.5, 40)),
                         (rng.uniform(0.1, 5), rng.uniform(0.1, 3), rng.uniform(0.1, 6)),
                         (rng.uniform(-0.5, 0.5), rng.uniform(-0.99, 1), rng.uniform(-0.99, 1)))


def tokenizer_corpus(n: int = 1500, seed: int = 0) -> Iterator[str]:
    """Deterministic grammar-like text (prompts, grounded sentences, 2D/3D boxes, points) to train the BPE."""
    rng = random.Random(seed)
    for _ in range(n):
        c, c2 = rng.choice(_CATEGORIES), rng.choice(_CATEGORIES)
        g, g2 = grammar.format_grounded(_rand_box(rng)), grammar.format_grounded(_rand_box(rng))
        d = f"{rng.uniform(0, 20):.2f}"
        user = rng.choice(_PROMPTS).format(c=c, c2=c2, g=g, g2=g2)
        kind = rng.random()
        if kind < 0.4:
            answer = g + grammar.format_box3d(_rand_box3d(rng))
        elif kind < 0.6:
            answer = grammar.format_point3d((rng.uniform(-3, 3), rng.uniform(-2, 2), rng.uniform(0.2, 9)))
        else:
            answer = rng.choice(_SENTENCES).format(c=c, c2=c2, g=g, g2=g2, d=d)
        yield f"{IM_START}user\n{IMAGE_TOKEN}\n{user}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"


# ---------------------------------------------------------------------------------------------- build / load

def build_tiny_tokenizer(vocab_size: int = 640, seed: int = 0) -> Any:
    """Train a byte-level BPE offline and wrap it as a Qwen2Tokenizer carrying the GR3D tokens.

    Trained with exactly the pre-tokenizer Qwen2Tokenizer applies at run time, so every learned merge is
    reachable and digits stay single tokens.
    """
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = gr3d_special_tokens()
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(specials)  # never split them while counting pairs
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(seed=seed), trainer)
    m = json.loads(bpe.to_str())["model"]
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
    tok = Qwen2Tokenizer(vocab=m["vocab"], merges=merges, eos_token=IM_END, pad_token=ENDOFTEXT,
                         unk_token=ENDOFTEXT)
    add_gr3d_tokens(tok)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def add_gr3d_tokens(tokenizer: Any) -> int:
    """Make every GR3D token a single special id on `tokenizer` (in place); returns how many were new."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in gr3d_special_tokens() if t not in vocab]
    present = [t for t in gr3d_special_tokens() if t in vocab]
    # Tokens already in the vocabulary must still be *added* tokens, or the pre-tokenizer would split them.
    n_new = tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in present + missing],
                                 special_tokens=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    for t in gr3d_special_tokens():
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"token {t!r} is not a single id after adding it: {ids}")
    return n_new


def gr3d_token_ids(tokenizer: Any) -> dict[str, int]:
    """The ids the model needs at run time."""
    def one(t: str) -> int:
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{t!r} is not a single token in this tokenizer; call add_gr3d_tokens first")
        return int(ids[0])

    return {"image": one(IMAGE_TOKEN), "region": one(grammar.REGION), "bbox_open": one(grammar.BBOX_OPEN),
            "bbox_close": one(grammar.BBOX_CLOSE), "box3d_open": one(grammar.BOX3D_OPEN),
            "box3d_close": one(grammar.BOX3D_CLOSE), "eos": one(IM_END), "im_start": one(IM_START),
            "pad": one(ENDOFTEXT)}


def load_tokenizer(path: str | Path) -> Any:
    """A saved tokenizer from a local directory (never the hub), with the GR3D tokens ensured."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_gr3d_tokens(tok)
    return tok


# ---------------------------------------------------------------------------------------------- encoding

@dataclass
class EncodedConversation:
    """One tokenized sample. `labels[i]` is the target of position i (IGNORE_INDEX where unsupervised)."""

    input_ids: list[int]
    labels: list[int]
    region_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    """Box of every `<region>` token, in order, normalized to the original image."""
    region_in_response: list[bool] = field(default_factory=list)
    """Per region: it is in an assistant turn (inserted by the model -> detached in training)."""


def normalize_turns(turns: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Accept record turns (`from`: human/gpt, `value`) or chat messages (`role`, `content`)."""
    out = []
    for t in turns:
        role = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        if role not in _ROLE or not isinstance(text, str):
            raise ValueError(f"bad turn {t!r}: need from/role in {sorted(_ROLE)} and a string value/content")
        out.append((_ROLE[role], text))
    return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def encode_conversation(tokenizer: Any, turns: Sequence[Mapping[str, str]], num_image_tokens: int | Sequence[int],
                        system: str | None = DEFAULT_SYSTEM, add_generation_prompt: bool = False,
                        with_image: bool = True) -> EncodedConversation:
    """Input ids and labels of a conversation in NVILA's chat format.

    With `with_image`, the single `<image>` placeholder (prepended as `<image>\\n` to the first user turn
    when no turn has one) is expanded to `num_image_tokens` ids; the model overwrites them with the visual
    tokens. A sequence of counts (NVILA tiles) expands to each tile's ids with a newline between tiles, as
    NVILA ends every tile's features with "\n" (the text's own newline after `<image>` ends the last).
    Region boxes come from the text via `schemas.grammar.find_grounded`.
    """
    tid = gr3d_token_ids(tokenizer)
    msgs = normalize_turns(turns)
    n_img = sum(text.count(IMAGE_TOKEN) for _, text in msgs)
    if with_image:
        if n_img > 1:
            raise ValueError(f"one image per sample: found {n_img} {IMAGE_TOKEN} placeholders")
        if n_img == 0:
            first_user = next((i for i, (r, _) in enumerate(msgs) if r == "user"), None)
            if first_user is None:
                raise ValueError("no user turn to attach the image to")
            msgs[first_user] = ("user", IMAGE_TOKEN + "\n" + msgs[first_user][1])
    elif n_img:
        raise ValueError(f"{IMAGE_TOKEN} in the text but with_image=False")
    if system is not None and (not msgs or msgs[0][0] != "system"):
        msgs.insert(0, ("system", system))

    ids: list[int] = []
    labels: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    in_resp: list[bool] = []
    for role, text in msgs:
        grammar.check_regions(text)
        found = [g.box for g in grammar.find_grounded(text) if g.has_region]
        head = _ids(tokenizer, f"{IM_START}{role}\n")
        body = _ids(tokenizer, text)
        if sum(1 for i in body if i == tid["region"]) != len(found):
            raise ValueError(f"{grammar.REGION} count does not match the grounded boxes in {text!r}")
        tail = _ids(tokenizer, IM_END)
        nl = _ids(tokenizer, "\n")
        ids += head + body + tail + nl
        sup = role == "assistant"
        labels += [IGNORE_INDEX] * len(head)
        labels += [(i if sup and i not in (tid["region"], tid["image"]) else IGNORE_INDEX) for i in body]
        labels += (tail if sup else [IGNORE_INDEX] * len(tail)) + [IGNORE_INDEX] * len(nl)
        boxes += [tuple(float(v) for v in b) for b in found]  # type: ignore[misc]
        in_resp += [sup] * len(found)
    if add_generation_prompt:
        gen = _ids(tokenizer, f"{IM_START}assistant\n")
        ids += gen
        labels += [IGNORE_INDEX] * len(gen)

    if with_image:
        pos = ids.index(tid["image"])
        counts = [num_image_tokens] if isinstance(num_image_tokens, int) else list(num_image_tokens)
        sep = _ids(tokenizer, "\n")
        expanded = [t for i, n in enumerate(counts) for t in (sep if i else []) + [tid["image"]] * n]
        ids[pos:pos + 1] = expanded
        labels[pos:pos + 1] = [IGNORE_INDEX] * len(expanded)
    return EncodedConversation(ids, labels, boxes, in_resp)  # type: ignore[arg-type]


def encode_prompt(tokenizer: Any, prompt: str, num_image_tokens: int | Sequence[int], system: str | None = DEFAULT_SYSTEM,
                  with_image: bool = True) -> EncodedConversation:
    """A single user prompt followed by the assistant generation prefix (what `generate` prefills)."""
    return encode_conversation(tokenizer, [{"from": "human", "value": prompt}], num_image_tokens, system=system,
                               add_generation_prompt=True, with_image=with_image)
