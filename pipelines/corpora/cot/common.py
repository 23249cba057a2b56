"""Constants, reject reasons and small helpers every cot stage shares."""

from __future__ import annotations

from typing import Any

from pipelines.engine.stage import Item, StageSetupError

CACHE_RELPATH = "cache/annotator_cache.sqlite"
TASK = "grounded_cot"


GRAMMAR_TOKENS = ("<bbox>", "</bbox>", "<region>", "<3d_box", "</3d_box>")
DEFAULT_MAX_TURN_CHARS = 4000  # third-party cleaners report corrupted run-on turns in RefSpatial


REJECT_REASONS: dict[str, str] = {
    # read
    "bad_source_file": "a whole RefSpatial file is unreadable (not UTF-8, invalid or truncated JSON): one row, "
                       "the other files are still read",
    "malformed_record": "the RefSpatial record is not an object with image and conversations (reader)",
    "missing_image": "the image file does not exist (reader)",
    "path_escapes_root": "an image/depth path leaves its data root (reader)",
    "multi_image": "the record has several images; a cot sample grounds in one image",
    "unsupported_image_format": "the image is neither PNG nor JPEG (shards keep original bytes)",
    "unreadable_image": "the image cannot be decoded",
    "malformed_conversation": "turns do not alternate human, gpt or a turn is empty",
    "turn_too_long": "a turn is longer than the limit (corrupted run-on text)",
    "grammar_tokens_in_text": "the source text already contains <bbox>/<region>/<3d_box> tokens",
    "point_out_of_range": "a point answer lies outside [0, 1]",
    "no_mentions": "no object mention in the reasoning/answer turns",
    # tag
    "model_error": "the tagger model failed on this sample's requests (message: 'tagger: <type>: <message>'); "
                   "a failing batch is re-tagged one sample at a time",
    # assign (per the first failing mention, or the whole sample)
    "no_candidates": "the tagger proposed no box for a mention",
    "verifier_none": "the verifier said none of the candidates is the mentioned object",
    "low_confidence": "the verifier's confidence is below --min-confidence",
    "verifier_malformed_output": "the verifier's output stayed unusable after the repair retry (raw kept)",
    "ambiguous_alignment": "two different mentions claim the same box (one-to-one fails)",
    "no_mention_grounded": "--allow-partial and still no mention was grounded",
    # rewrite
    "rewrite_malformed_output": "the rewriter's output stayed unusable after the repair retry (raw kept)",
}


Row = dict[str, Any]


class RowsPerSample:
    """`Stage.from_rows` of the cot stages, whose intermediate rows belong to one sample each (a mixin,
    before `Stage`): the rows are grouped by key (in file order) and each input that has rows is rebuilt
    by the stage's `sample_from_rows(input, its rows)`, in input order. An input without rows had no
    output (the executor restores its reject)."""

    def sample_from_rows(self, it: Item, rows: list[Row]) -> Item:
        raise NotImplementedError

    def from_rows(self, inputs: list[Item], rows: list[Row]) -> list[Item]:
        by_key: dict[str, list[Row]] = {}
        for r in rows:
            by_key.setdefault(r["key"], []).append(r)
        return [self.sample_from_rows(it, by_key[it["key"]]) for it in inputs if it["key"] in by_key]


def by_mention(rows: list[Row]) -> dict[int, Row]:
    """One sample's intermediate rows (one per mention) by mention index."""
    return {r["mention_index"]: r for r in rows}


class ModelUnavailable(StageSetupError):
    """A model endpoint failed for good (after the client's retries): the run stops.

    A subclass of StageSetupError because that is the one exception the executors let through a
    stage (any other becomes a per-sample `exception` reject); rejecting every sample because a
    server is down would silently empty the corpus.
    """


def _load_rgb(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _mention_of(it: Item, e: dict[str, Any]) -> Any:
    from annotators.common import Mention

    turn, start, end, text = e["spans"][0]
    return Mention(text, it["id"], turn, start, end)
