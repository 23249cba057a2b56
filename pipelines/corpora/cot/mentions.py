"""Object mentions in RefSpatial conversations: deterministic, rule-based noun-phrase extraction.

Why rules and not a parser: the CoT corpus must be rebuilt byte for byte, the extractor runs on
millions of short template-generated texts, and the grammar of those texts is narrow ("the red cup
is to the left of the laptop"). A mention is

    determiner  modifier{0,4}  category-noun

- determiner: the, a, an, this, that, another (case-insensitive);
- modifiers: alphabetic words that are not function words, verbs or spatial relation words
  (colours, sizes, materials, "left", "wooden", ...);
- category noun: the longest entry of the vocabulary ending the phrase: the Omni3D 50 categories,
  the EmbodiedScan 288 categories (a few uselessly generic ones removed) and the household / OpenImages
  words RefSpatial text uses, plus the question's own objects (below). Multi-word nouns ("night stand",
  "coffee table") win over their last word.

Tied to the question's objects: the human turns are scanned for "determiner modifiers WORD" phrases
whose WORD is followed by a phrase boundary (a preposition, "that"/"which", "or"/"and", punctuation,
the end). Such WORDs that are not spatial words extend the vocabulary for that record, so an
open-vocabulary object the question names ("Point to the mug closest to ...") is recognised when the
reasoning mentions it again, even if it is in no list. `question_only=True` keeps only mentions whose
category the question names.

Plural phrases ("the chairs") are not mentions: they name several objects and one box cannot ground
them. Categories whose name is plural ("books", "shelves") are singular entities.

`extract_mentions` returns `ExtractedMention`s: an `annotators.Mention` (text, record id, turn,
character span in that turn's value: what the oracle annotators look up) plus the category and the
entity key (lower-cased phrase without the determiner) under which repeated mentions of the same
object are grouped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from annotators.common import Mention

__all__ = [
    "OMNI3D_CATEGORIES",
    "EMBODIEDSCAN_CATEGORIES",
    "EXTRA_NOUNS",
    "DEFAULT_VOCABULARY",
    "ExtractedMention",
    "Entity",
    "Vocabulary",
    "extract_mentions",
    "group_entities",
    "question_objects",
]

from schemas.categories import OMNI3D_CATEGORIES

# EmbodiedScan's 288 classes (embodiedscan/datasets/embodiedscan_dataset.py METAINFO['classes']).
EMBODIEDSCAN_CATEGORIES: tuple[str, ...] = (
    "adhesive tape", "air conditioner", "alarm", "album", "arch", "backpack", "bag", "balcony", "ball",
    "banister", "bar", "barricade", "baseboard", "basin", "basket", "bathtub", "beam", "beanbag", "bed",
    "bench", "bicycle", "bidet", "bin", "blackboard", "blanket", "blinds", "board", "body loofah", "book",
    "boots", "bottle", "bowl", "box", "bread", "broom", "brush", "bucket", "cabinet", "calendar", "camera",
    "can", "candle", "candlestick", "cap", "car", "carpet", "cart", "case", "ceiling", "chair", "chandelier",
    "cleanser", "clock", "clothes", "clothes dryer", "coat hanger", "coffee maker", "coil", "column",
    "commode", "computer", "conducting wire", "container", "control", "copier", "cosmetics", "couch",
    "counter", "countertop", "crate", "crib", "cube", "cup", "curtain", "cushion", "decoration", "desk",
    "detergent", "device", "dish rack", "dishwasher", "dispenser", "divider", "door", "door knob",
    "doorframe", "doorway", "drawer", "dress", "dresser", "drum", "duct", "dumbbell", "dustpan", "dvd",
    "eraser", "excercise equipment", "fan", "faucet", "fence", "file", "fire extinguisher", "fireplace",
    "floor", "flowerpot", "flush", "folder", "food", "footstool", "frame", "fruit", "furniture",
    "garage door", "garbage", "glass", "globe", "glove", "grab bar", "grass", "guitar", "hair dryer",
    "hamper", "handle", "hanger", "hat", "headboard", "headphones", "heater", "helmets", "holder", "hook",
    "humidifier", "ironware", "jacket", "jalousie", "jar", "kettle", "keyboard", "kitchen island",
    "kitchenware", "knife", "label", "ladder", "lamp", "laptop", "ledge", "letter", "light", "luggage",
    "machine", "magazine", "mailbox", "map", "mask", "mat", "mattress", "menu", "microwave", "mirror",
    "molding", "monitor", "mop", "mouse", "napkins", "notebook", "object", "ottoman", "oven", "pack",
    "package", "pad", "pan", "panel", "paper", "paper cutter", "partition", "pedestal", "pen", "person",
    "piano", "picture", "pillar", "pillow", "pipe", "pitcher", "plant", "plate", "player", "plug",
    "plunger", "pool", "pool table", "poster", "pot", "price tag", "printer", "projector", "purse", "rack",
    "radiator", "radio", "rail", "range hood", "refrigerator", "remote control", "ridge", "rod", "roll",
    "roof", "rope", "sack", "salt", "scale", "scissors", "screen", "seasoning", "shampoo", "sheet", "shelf",
    "shirt", "shoe", "shovel", "shower", "sign", "sink", "soap", "soap dish", "soap dispenser", "socket",
    "speaker", "sponge", "spoon", "stairs", "stall", "stand", "stapler", "statue", "steps", "stick",
    "stool", "stopcock", "stove", "structure", "sunglasses", "support", "switch", "table", "tablet",
    "teapot", "telephone", "thermostat", "tissue", "tissue box", "toaster", "toilet", "toilet paper",
    "toiletry", "tool", "toothbrush", "toothpaste", "towel", "toy", "tray", "treadmill", "trophy", "tube",
    "tv", "umbrella", "urn", "utensil", "vacuum cleaner", "vanity", "vase", "vent", "ventilation", "wall",
    "wardrobe", "washbasin", "washing machine", "water cooler", "water heater", "window", "window frame",
    "windowsill", "wine", "wire", "wood", "wrap",
)  # fmt: skip

# EmbodiedScan classes that are words of ordinary English far more often than objects in this text
# ("the support of", "the control", "the file"), or not boxable things.
_TOO_GENERIC = frozenset({
    "support", "structure", "control", "file", "label", "letter", "wrap", "stick", "roll", "scale",
    "salt", "wine", "wood", "grass", "food", "ridge", "flush", "ventilation", "garbage", "menu", "pad",
    # the viewer, not an object ("farther from the camera"); stuff, not boxable objects
    "camera", "floor", "wall", "ceiling", "object", "roof",
})  # fmt: skip

# Objects of RefSpatial text (OpenImages / CA-1M / simulator scenes) missing from both lists.
EXTRA_NOUNS: tuple[str, ...] = (
    "mug", "bowl", "plate", "fork", "spoon", "knife", "glass", "wine glass", "jug", "teacup", "saucer",
    "apple", "banana", "orange", "lemon", "tomato", "carrot", "bread", "cake", "donut", "sandwich", "pizza",
    "vase", "flower", "flowers", "houseplant", "potted plant", "tree", "bush",
    "man", "woman", "boy", "girl", "child", "person", "people", "dog", "cat", "bird", "horse",
    "couch", "armchair", "stool", "bench", "ottoman", "nightstand", "night stand", "coffee table",
    "dining table", "side table", "end table", "kitchen table", "desk lamp", "floor lamp", "table lamp",
    "bookshelf", "shelf", "drawer", "cupboard", "sideboard", "wardrobe", "closet", "fridge",
    "microwave", "toaster", "kettle", "sink", "faucet", "tap", "oven", "stove", "dishwasher",
    "tv", "television", "monitor", "screen", "computer", "laptop", "keyboard", "mouse", "phone",
    "cell phone", "mobile phone", "remote", "remote control", "speaker", "printer", "clock", "watch",
    "book", "notebook", "magazine", "newspaper", "pen", "pencil", "marker", "scissors", "stapler",
    "bag", "handbag", "backpack", "suitcase", "box", "basket", "bucket", "bin", "trash can",
    "garbage can", "wastebasket", "container", "jar", "can", "bottle", "water bottle", "cup", "tray",
    "pillow", "cushion", "blanket", "towel", "rug", "carpet", "mat", "curtain", "blind",
    "painting", "picture", "poster", "photo", "frame", "mirror", "window", "door", "drawer",
    "plant", "pot", "flowerpot", "candle", "toy", "teddy bear", "ball", "doll", "hat", "shoe", "boot",
    "umbrella", "guitar", "piano", "bicycle", "bike", "car", "truck", "bus", "motorcycle", "van",
    "traffic light", "stop sign", "sign", "fire hydrant", "parking meter", "bench", "building", "house",
    "lamp", "light", "chandelier", "fan", "heater", "radiator", "vent", "outlet", "switch",
    "countertop", "counter", "island", "table", "desk", "chair", "sofa", "bed", "cabinet", "dresser",
    "shelves", "rack", "hanger", "hook", "ladder", "stairs", "railing", "column", "pillar",
    "sculpture", "statue", "trophy", "globe", "lid", "cap", "cover", "handle", "knob",
)  # fmt: skip

DEFAULT_VOCABULARY: frozenset[str] = frozenset(
    {c for c in OMNI3D_CATEGORIES + EMBODIEDSCAN_CATEGORIES + EXTRA_NOUNS if c not in _TOO_GENERIC}
)

DETERMINERS = frozenset({"the", "a", "an", "this", "that", "another"})

# Words that end a modifier run: function words, auxiliaries and common verbs, relation words that
# cannot modify a noun in this text, numbers-as-words, pronouns.
_STOP = frozenset("""
a an the this that these those another each every both all any some no none its it their there here
is are was were be been being am has have had do does did can could will would shall should may might must
to of in on at by for from with without into onto over under above below behind near nearby beside besides
between among around about against along across through toward towards than then as like so such
and or but nor not if while when where which who whom whose what why how
closer closest farther farthest further nearer nearest
positioned located placed situated sits sitting stands standing lies lying appears seems looks
point points answer coordinates coordinate tuple tuples image camera viewer
one two three four five six seven eight nine ten first second third
i you he she we they me him her us them my your our
""".split())  # fmt: skip

# Nouns of the question that are places, directions or parts of the image, never objects.
_NOT_OBJECTS = frozenset("""
left right top bottom front back middle center centre side sides edge edges corner corners part parts
area areas space spaces region regions surface position location direction distance height width size
image camera view viewer scene picture frame point points answer coordinates pixel pixels tuple tuples
floor ground wall walls ceiling room way one ones thing things object objects item items
list conditions condition pixel locations format
""".split())  # fmt: skip

_TOKEN = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:\.\d+)?|\S")
_BOUNDARY_WORDS = frozenset("""
that which who whose where to of in on at by for from with near beside behind above below under over
between among than and or but is are closest nearest farthest furthest located positioned placed
""".split())  # fmt: skip


class _Tok(NamedTuple):
    text: str
    low: str
    start: int
    end: int


def _tokens(text: str) -> list[_Tok]:
    out = []
    for m in _TOKEN.finditer(text):
        t = m.group(0)
        if t[0].isalpha() and t.endswith("'s"):  # possessive: "the chair's leg" -> "the chair"
            out.append(_Tok(t[:-2], t[:-2].lower(), m.start(), m.end() - 2))
        else:
            out.append(_Tok(t, t.lower(), m.start(), m.end()))
    return out


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "xes", "ses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


@dataclass(frozen=True)
class Vocabulary:
    """Category nouns (lower case, single spaces), indexed by their last word for longest matching."""

    nouns: frozenset[str]

    @classmethod
    def of(cls, nouns: Iterable[str]) -> Vocabulary:
        return cls(frozenset(" ".join(n.lower().split()) for n in nouns if n and n.strip()))

    def extend(self, nouns: Iterable[str]) -> Vocabulary:
        return Vocabulary.of([*self.nouns, *nouns])

    def match_ending_at(self, toks: Sequence[_Tok], i: int, lo: int) -> int | None:
        """Start index of the longest noun made of toks[s..i] (s >= lo), or None."""
        best = None
        for s in range(i, max(lo, i - 3) - 1, -1):
            if " ".join(t.low for t in toks[s : i + 1]) in self.nouns:
                best = s
        return best

    def is_plural_of_noun(self, word: str) -> bool:
        return word not in self.nouns and _singular(word) != word and _singular(word) in self.nouns


_DEFAULT = Vocabulary(DEFAULT_VOCABULARY)


class ExtractedMention(NamedTuple):
    """One object mention: where it is (an `annotators.Mention`), its category and its entity key."""

    mention: Mention
    category: str
    entity: str
    in_question: bool


@dataclass(frozen=True)
class Entity:
    """The mentions of one object in a record (same entity key), in text order."""

    key: str
    category: str
    mentions: tuple[Mention, ...]

    @property
    def first(self) -> Mention:
        return self.mentions[0]


def _is_modifier(tok: _Tok) -> bool:
    return tok.text[0].isalpha() and tok.low not in _STOP and tok.low not in DETERMINERS


def _phrases(text: str, vocab: Vocabulary, max_modifiers: int) -> list[tuple[int, int, str, str]]:
    """(start, end, category, entity key) of every mention in `text`, left to right, non-overlapping.

    From each determiner, words are read while they can be modifiers; every position where a
    vocabulary noun ends (preceded only by modifiers) is a candidate end, and the longest one wins
    ("the light blue chair" over "the light"). A plural of a vocabulary noun before any match ends
    the attempt with no mention.
    """
    toks = _tokens(text)
    out: list[tuple[int, int, str, str]] = []
    i = 0
    while i < len(toks):
        if toks[i].low not in DETERMINERS:
            i += 1
            continue
        best: tuple[int, int] | None = None  # token indices of (noun start, noun end)
        j = i + 1
        while j < len(toks) and j - i - 1 <= max_modifiers + 3:
            t = toks[j]
            s = vocab.match_ending_at(toks, j, i + 1)
            if s is not None and s - i - 1 <= max_modifiers and all(_is_modifier(x) for x in toks[i + 1 : s]):
                best = (s, j)
            elif best is None and vocab.is_plural_of_noun(t.low):
                break  # "the red boxes": several objects, not a mention
            if not _is_modifier(t):
                break
            j += 1
        if best is None:
            i += 1
            continue
        s, e = best
        category = " ".join(t.low for t in toks[s : e + 1])
        entity = " ".join(t.low for t in toks[i + 1 : e + 1])
        out.append((toks[i].start, toks[e].end, category, entity))
        i = e + 1
    return out


def question_objects(text: str, vocab: Vocabulary = _DEFAULT, max_modifiers: int = 4) -> list[str]:
    """Head nouns of the objects a question names (vocabulary phrases plus open-vocabulary heads).

    An open-vocabulary head is a word after a determiner (and modifiers) that is followed by a
    phrase boundary and is not a spatial or image word: "the mug" in "Point to the mug closest to
    the laptop" gives "mug" even if no list contains it.
    """
    heads = [c for _, _, c, _ in _phrases(text, vocab, max_modifiers)]
    toks = _tokens(text)
    for i, t in enumerate(toks):
        if t.low not in DETERMINERS:
            continue
        j = i + 1
        while j < len(toks) and j - i <= max_modifiers + 1 and _is_modifier(toks[j]):
            nxt = toks[j + 1] if j + 1 < len(toks) else None
            if nxt is None or not nxt.text[0].isalnum() or nxt.low in _BOUNDARY_WORDS:
                w = toks[j].low
                if w not in _NOT_OBJECTS and _singular(w) == w and len(w) > 2:
                    heads.append(w)
                break
            j += 1
    seen: dict[str, None] = {}
    for h in heads:
        seen.setdefault(h, None)
    return list(seen)


def extract_mentions(
    conversations: Sequence[Mapping[str, str]],
    record_id: str,
    *,
    vocabulary: Vocabulary | Iterable[str] | None = None,
    turns: str = "gpt",
    question_only: bool = False,
    max_modifiers: int = 4,
) -> list[ExtractedMention]:
    """Object mentions of a record's turns (`turns`: "gpt" = the reasoning/answers, or "all").

    The vocabulary is `DEFAULT_VOCABULARY` (or the given one) extended with the objects the human
    turns name (`question_objects`). With `question_only`, only mentions whose category is one of
    those question objects are kept. Spans index each turn's original `value`.
    """
    if turns not in ("gpt", "all"):
        raise ValueError(f"turns must be 'gpt' or 'all', got {turns!r}")
    base = vocabulary if isinstance(vocabulary, Vocabulary) else (
        _DEFAULT if vocabulary is None else Vocabulary.of(vocabulary))
    q_objects: list[str] = []
    for t in conversations:
        if t.get("from") == "human":
            q_objects.extend(question_objects(t.get("value", ""), base, max_modifiers))
    q_set = set(q_objects)
    vocab = base.extend(q_objects) if q_objects else base
    out: list[ExtractedMention] = []
    for k, t in enumerate(conversations):
        if turns == "gpt" and t.get("from") != "gpt":
            continue
        value = t.get("value", "")
        for start, end, category, entity in _phrases(value, vocab, max_modifiers):
            if question_only and category not in q_set:
                continue
            out.append(ExtractedMention(Mention(value[start:end], record_id, k, start, end), category, entity,
                                        category in q_set))
    return out


def group_entities(mentions: Sequence[ExtractedMention]) -> list[Entity]:
    """Group mentions by entity key ("The red cup" and "the red cup" are one object), first-seen order."""
    groups: dict[str, list[ExtractedMention]] = {}
    for m in mentions:
        groups.setdefault(m.entity, []).append(m)
    return [Entity(key, ms[0].category, tuple(m.mention for m in ms)) for key, ms in groups.items()]
