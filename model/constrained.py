"""Grammar-constrained decoding: a logits processor that keeps generation inside the answer grammar.

A small model (and sometimes a big one) leaves the grammar: it repeats `rotation=` until the token limit,
writes a fourth number, or never closes `</3d_box>`, and the strict parser then finds nothing. With
this processor every step may only choose tokens that keep the text a prefix of a valid answer:
numbers only where numbers go (with the digit counts the corpora write), literals such as
`" dimensions="` and `"></3d_box>` forced once the numbers before them are complete, and `<|im_end|>`
only where an answer may end. The region slot after `</bbox>` is inserted by `model.generate` itself.

Answers (the corpora's formats, `schemas.grammar`):
- `detect`: objects `<bbox>[x1, y1, x2, y2]</bbox><region> <3d_box ...></3d_box>`, one per line, then EOS
  (at most `max_items` objects, so a large enough `max_new_tokens` always ends well-formed);
- `detect_direct`: the same without the grounded 2D prefix, `<3d_box ...></3d_box>` per line (a model trained
  with `data.det3d_answer: direct`; `detect_kind` picks the grammar from the model's config);
- `box3d`: one `<3d_box ...></3d_box>` then EOS (region -> 3D);
- `bbox`: one `<bbox>[..]</bbox>` (+ region) then EOS (2D grounding).

Tokens are matched by their decoded text, character by character, so any tokenization of a literal or a
number is allowed; grammar tags are matched by their single special id only. Allowed sets are cached per
automaton state (states repeat: a few hundred per grammar), so a step costs one dict lookup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from schemas import grammar

__all__ = ["Num", "Tok", "GRAMMARS", "GrammarConstraint", "detect_kind"]


@dataclass(frozen=True)
class Num:
    """A fixed-point number slot: optional minus, 1..max_int integer digits, exactly `dec` decimals.

    `max_one`: the value is at most 1 (integer part 0 or 1, and 1 only as 1.00..); `positive`: not zero
    (and no minus); `half_open`: in (-1, 1] (rotations are angles / pi; -1 is written as 1).
    `keep`: remember the value (a later slot of the element is bounded by it); `at_least`: the value is
    >= the `at_least`-th kept value (a 2D box's x2 >= x1, y2 >= y1, as the grammar's parser requires);
    `release`: forget the kept values once this slot is complete (they bound nothing further, and states
    without them repeat, so their masks stay cached).
    """

    dec: int
    neg: bool = True
    max_int: int = 2
    max_one: bool = False
    positive: bool = False
    half_open: bool = False
    keep: bool = False
    at_least: int | None = None
    release: bool = False


@dataclass(frozen=True)
class Tok:
    """A grammar tag that is one special token (`<bbox>`, `</3d_box>`...); `optional` may be skipped."""

    text: str
    optional: bool = False


Item = str | Num | Tok

_B = Num(dec=3, neg=False, max_int=1, max_one=True)
_B_LO = Num(dec=3, neg=False, max_int=1, max_one=True, keep=True)
_B_X2 = Num(dec=3, neg=False, max_int=1, max_one=True, at_least=0)
_B_Y2 = Num(dec=3, neg=False, max_int=1, max_one=True, at_least=1, release=True)
_C = Num(dec=2, neg=True, max_int=2)
_D = Num(dec=2, neg=False, max_int=2, positive=True)
_R = Num(dec=2, neg=True, max_int=1, max_one=True, half_open=True)


def _seq(*parts: Sequence[Item]) -> tuple[Item, ...]:
    return tuple(x for p in parts for x in p)


_BBOX: tuple[Item, ...] = (Tok(grammar.BBOX_OPEN), "[", _B_LO, ", ", _B_LO, ", ", _B_X2, ", ", _B_Y2, "]", Tok(grammar.BBOX_CLOSE),
                           Tok(grammar.REGION, optional=True))
_BOX3D: tuple[Item, ...] = (Tok(grammar.BOX3D_OPEN), ' center="', _C, ", ", _C, ", ", _C, '" dimensions="', _D, ", ",
                            _D, ", ", _D, '" rotation="', _R, ", ", _R, ", ", _R, '">', Tok(grammar.BOX3D_CLOSE))

GRAMMARS: dict[str, tuple[tuple[Item, ...], str | None]] = {
    "detect": (_seq(_BBOX, (" ",), _BOX3D), "\n"),
    "detect_direct": (_BOX3D, "\n"),
    "box3d": (_BOX3D, None),
    "bbox": (_BBOX, None),
}
"""name -> (items of one element, separator between repeated elements or None for exactly one)."""


def detect_kind(config: Any) -> str:
    """The detection grammar of a model: `detect` (grounded answers) or `detect_direct` (its config says direct)."""
    return "detect_direct" if getattr(config, "det3d_answer", "grounded") == "direct" else "detect"


# Automaton state: (element count done, item index, sub-state, kept values). Item index len(items) = after an
# element; -1 = inside the separator. Sub-state: position in a literal, or a number's (sign, int digits,
# decimals). Kept values: the values (in units of the last decimal) of the `keep` numbers not yet released.
State = tuple[int, int, Any, tuple[int, ...]]

_MASKS: dict[tuple[int, int, str, int], dict[State, torch.Tensor]] = {}


class GrammarConstraint:
    """`logits_processor` for `model.generate`: masks every token that would leave the grammar.

    One instance serves one `generate` call (it keeps each batch row's automaton state).
    """

    def __init__(self, tokenizer: Any, kind: str = "detect", max_items: int = 8) -> None:
        if kind not in GRAMMARS:
            raise ValueError(f"unknown grammar {kind!r} (known: {', '.join(GRAMMARS)})")
        self.items, self.sep = GRAMMARS[kind]
        self.max_items = max_items if self.sep is not None else 1
        from model.tokenizer import gr3d_token_ids

        tid = gr3d_token_ids(tokenizer)
        self.eos = tid["eos"]
        self.special = {grammar.BBOX_OPEN: tid["bbox_open"], grammar.BBOX_CLOSE: tid["bbox_close"],
                        grammar.REGION: tid["region"], grammar.BOX3D_OPEN: tid["box3d_open"],
                        grammar.BOX3D_CLOSE: tid["box3d_close"]}
        specials = set(getattr(tokenizer, "all_special_ids", [])) | set(tid.values())
        self.vocab = len(tokenizer)
        # plain tokens by decoded text (special ones never match characters)
        self.texts: list[tuple[int, str]] = []
        for i in range(self.vocab):
            if i in specials:
                continue
            s = tokenizer.decode([i], skip_special_tokens=False)
            if s and "\ufffd" not in s:
                self.texts.append((i, s))
        self._text_of = dict(self.texts)
        self._by_first: dict[str, list[tuple[int, str]]] = {}
        for i, t in self.texts:
            self._by_first.setdefault(t[0], []).append((i, t))
        key = (id(tokenizer), self.vocab, kind, self.max_items)
        self._masks: dict[State, torch.Tensor] = _MASKS.setdefault(key, {})  # shared: states repeat across calls
        self._rows: dict[int, tuple[int, State]] = {}

    # ------------------------------------------------------------------ automaton
    def _start_item(self, n: int, k: int, kept: tuple[int, ...] = ()) -> State:
        """State at the start of item k of element n (k == len(items): element complete)."""
        if k < len(self.items) and isinstance(self.items[k], Num):
            return (n, k, ("", "", None), kept)
        return (n, k, 0, kept)

    def _after_item(self, n: int, k: int, kept: tuple[int, ...] = ()) -> State:
        k += 1
        if k == len(self.items):
            return (n + 1, k, 0, ())
        return self._start_item(n, k, kept)

    @staticmethod
    def _max_value(spec: Num, sub: tuple[str, str, str | None]) -> float:
        """Largest value (units of the last decimal) a number starting with `sub` can still reach."""
        sign, ints, decs = sub
        if sign:
            return 0.0 if ints or decs else math.inf  # only the non-negative slots are bounded
        if not ints:
            return 10**spec.dec if spec.max_one else math.inf
        if spec.max_one and ints == "1":
            return 10**spec.dec
        if decs is None and len(ints) < spec.max_int and not spec.max_one and ints != "0":
            return math.inf
        return int(ints) * 10**spec.dec + int((decs or "").ljust(spec.dec, "9"))

    def _num_feed(self, spec: Num, sub: tuple[str, str, str | None], c: str) -> tuple[str, str, str | None] | None:
        sign, ints, decs = sub
        if decs is None:
            if c == "-" and spec.neg and not sign and not ints:
                return ("-", ints, None)
            if c.isdigit() and len(ints) < spec.max_int:
                if ints == "0":
                    return None  # no leading zeros
                if spec.max_one and c not in "01":
                    return None
                if spec.half_open and sign and c != "0":
                    return None  # -1 is written as 1
                return (sign, ints + c, None)
            if c == "." and ints:
                return (sign, ints, "")
            return None
        if not c.isdigit() or len(decs) >= spec.dec:
            return None
        if spec.max_one and ints == "1" and c != "0":
            return None
        if spec.positive and len(decs) == spec.dec - 1 and int(ints) == 0 and set(decs) <= {"0"} and c == "0":
            return None
        return (sign, ints, decs + c)

    def _feed_char(self, st: State, c: str) -> State | None:
        n, k, sub, kept = st
        if k == len(self.items):  # element complete: the separator may start another
            if self.sep is None or n >= self.max_items:
                return None
            return self._feed_char((n, -1, 0, ()), c)
        if k == -1:
            if c != self.sep[sub]:
                return None
            return (n, -1, sub + 1, ()) if sub + 1 < len(self.sep) else self._start_item(n, 0)
        item = self.items[k]
        if isinstance(item, Tok):
            if item.optional:
                return self._feed_char(self._after_item(n, k, kept), c)
            return None
        if isinstance(item, str):
            if c != item[sub]:
                return None
            return (n, k, sub + 1, kept) if sub + 1 < len(item) else self._after_item(n, k, kept)
        new = self._num_feed(item, sub, c)
        if new is None:
            return None
        if item.at_least is not None and self._max_value(item, new) < kept[item.at_least]:
            return None  # no completion can reach the lower bound (x2 >= x1, y2 >= y1)
        if new[2] is not None and len(new[2]) == item.dec:
            value = (-1 if new[0] else 1) * (int(new[1]) * 10**item.dec + int(new[2]))
            kept = () if item.release else kept + (value,) if item.keep else kept
            return self._after_item(n, k, kept)
        return (n, k, new, kept)

    def _feed_token(self, st: State, tid: int) -> State | None:
        n, k, sub, kept = st
        if 0 <= k < len(self.items) and isinstance(self.items[k], Tok):
            item = self.items[k]
            if self.special[item.text] == tid:
                return self._after_item(n, k, kept)
            if item.optional:
                return self._feed_token(self._after_item(n, k, kept), tid)
            return None
        if tid in self.special.values():
            return None
        text = self._text_of.get(tid)
        if not text:
            return None
        for c in text:
            st = self._feed_char(st, c)  # type: ignore[assignment]
            if st is None:
                return None
        return st

    def _can_end(self, st: State) -> bool:
        n, k, _, _ = st
        return k == len(self.items) and n >= 1

    def allowed(self, st: State) -> torch.Tensor:
        """Boolean mask (V,) of the tokens allowed in state `st` (cached)."""
        m = self._masks.get(st)
        if m is not None:
            return m
        m = torch.zeros(self.vocab, dtype=torch.bool)
        n, k, _, kept = st
        if 0 <= k < len(self.items) and isinstance(self.items[k], Tok):
            m[self.special[self.items[k].text]] = True
            if self.items[k].optional:
                m |= self.allowed(self._after_item(n, k, kept))
                m[self.special[grammar.REGION]] = False  # generate inserts the region itself
        else:
            for first, group in self._by_first.items():
                if self._feed_char(st, first) is None:
                    continue
                for i, s in group:
                    cur: State | None = st
                    for c in s:
                        cur = self._feed_char(cur, c)  # type: ignore[arg-type]
                        if cur is None:
                            break
                    if cur is not None:
                        m[i] = True
        if self._can_end(st):
            m[self.eos] = True
        if not bool(m.any()):  # cannot happen for the packaged grammars; never leave generation stuck
            m[self.eos] = True
        self._masks[st] = m
        return m

    def state_of(self, token_ids: Sequence[int]) -> State:
        """Automaton state after `token_ids` (generated so far); raises if they left the grammar."""
        st = self._start_item(0, 0)
        for t in token_ids:
            nxt = self._feed_token(st, int(t))
            if nxt is None:
                raise ValueError(f"token {t} leaves the grammar at state {st}")
            st = nxt
        return st

    def __call__(self, b: int, token_ids: list[int], scores: torch.Tensor) -> torch.Tensor:
        done, st = self._rows.get(b, (0, self._start_item(0, 0)))
        if done > len(token_ids):  # a new generate call reusing the instance
            done, st = 0, self._start_item(0, 0)
        for t in token_ids[done:]:
            nxt = self._feed_token(st, int(t))
            if nxt is None:
                raise ValueError(f"token {t} leaves the grammar at state {st}")
            st = nxt
        self._rows[b] = (len(token_ids), st)
        mask = self.allowed(st).to(scores.device)
        return scores.masked_fill(~mask, -math.inf)
