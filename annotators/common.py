"""Value types shared by the taggers (Florence-2, oracle) and the verifiers (VLM, oracle).

Why here and not in each module: the builder swaps a real annotator for the oracle with one flag
(`--tagger oracle`), so both must speak exactly the same types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = ["Candidate", "Mention", "MentionLike", "mention_text", "Source"]

Source = Literal["phrase_grounding", "od", "oracle", "sim"]


class Candidate(NamedTuple):
    """One box proposed for one mention of one image.

    `box_xyxy_px` is in pixels of the ORIGINAL image (x1, y1, x2, y2, x2 >= x1, y2 >= y1).
    `mention_index` is the index of the mention in that image's mention list: mention texts can
    repeat within an image, the index cannot. `score` is None when the source gives none
    (Florence-2's post-processing returns no scores). `note` is what a simulated tagger did to make
    this box (`annotators.sim`: correct, wrong_instance, duplicate, ...); None for real taggers.
    """

    mention: str
    label: str
    box_xyxy_px: tuple[float, float, float, float]
    source: Source
    score: float | None = None
    mention_index: int = -1
    note: str | None = None


@dataclass(frozen=True)
class Mention:
    """A mention with its place in the RefSpatial source.

    The real annotators only read `text`. The oracle needs the location (record id, conversation
    turn, character span in that turn's value) to look up the ground truth, because the same text
    can name different objects in different places.
    """

    text: str
    record_id: str | None = None
    turn: int | None = None
    start: int | None = None
    end: int | None = None


MentionLike = str | Mention


def mention_text(m: MentionLike) -> str:
    """The surface text of a plain-string or structured mention."""
    return m.text if isinstance(m, Mention) else str(m)
