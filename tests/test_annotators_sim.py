"""Simulated annotators: their error rates are the flags' rates, scale 0 is the oracle, draws are
deterministic from (seed, key), and what they inject is recorded."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from annotators.common import Mention
from annotators.factory import make_tagger, make_verifier
from annotators.oracle import OracleTagger, OracleVerifier, box_iou, load_ground_truth
from annotators.sim import SIM_RATES, SimTagger, SimVerifier, perturb_box

W, H = 1000, 1000


def _synthetic_gt(path: Path, n_views: int = 1500) -> list[Mention]:
    """Views with two chairs and a table each, one mention per object (a record per view)."""
    rows, mentions = [], []
    for v in range(n_views):
        objs = [("chair", "red", (100, 100, 300, 400)), ("chair", "blue", (400, 100, 600, 400)),
                ("table", "brown", (650, 500, 900, 800))]
        pos = 0
        for k, (cat, colour, box) in enumerate(objs):
            text = f"the {colour} {cat}"
            rows.append({"record_id": f"r{v}", "turn": 1, "start": pos, "end": pos + len(text), "text": text,
                         "object_id": f"v{v}/o{k}", "category": cat, "colour": colour, "view_id": f"v{v}",
                         "bbox_px": list(box)})
            mentions.append(Mention(text, f"r{v}", 1, pos, pos + len(text)))
            pos += len(text) + 5
    path.write_text(json.dumps({"refspatial_mentions": rows}))
    return mentions


def _binom_ok(k: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Mention]]:
    p = tmp_path_factory.mktemp("sim") / "ground_truth.json"
    return p, _synthetic_gt(p)


def test_perturb_box_meets_the_drawn_iou() -> None:
    truth = (200.0, 200.0, 400.0, 300.0)
    for iou in (0.3, 0.55, 0.9):
        for aspect in (-0.5, 0.0, 0.4):
            loose = perturb_box(truth, iou, True, aspect, (W, H))
            tight = perturb_box(truth, iou, False, aspect, (W, H))
            assert box_iou(loose, truth) == pytest.approx(iou, abs=1e-9)
            assert box_iou(tight, truth) == pytest.approx(iou, abs=1e-9)
            assert loose[0] <= truth[0] and loose[2] >= truth[2]  # loose contains the truth
            assert tight[0] >= truth[0] and tight[2] <= truth[2]  # tight lies inside it


def test_tagger_error_rates_follow_the_flags(synth: tuple[Path, list[Mention]]) -> None:
    gt_path, mentions = synth
    tagger = make_tagger("sim", gt_path=gt_path, seed=3)
    assert isinstance(tagger, SimTagger)
    draws = [tagger.draw(m, (W, H)) for m in mentions]
    assert all(d is not None for d in draws)
    n = len(draws)
    out = Counter(d.outcome for d in draws)  # type: ignore[union-attr]
    rate = {k: v for k, (v, _) in SIM_RATES.items()}
    assert _binom_ok(out["miss"], n, rate["miss"])
    chairs = [d for d, m in zip(draws, mentions) if "chair" in m.text and d.outcome != "miss"]  # type: ignore[union-attr]
    assert _binom_ok(sum(d.outcome == "wrong_instance" for d in chairs), len(chairs), rate["wrong_instance"])
    tables = [d for d, m in zip(draws, mentions) if "table" in m.text and d.outcome != "miss"]  # type: ignore[union-attr]
    assert not any(d.outcome == "wrong_instance" for d in tables)  # impossible: no other table in view
    assert _binom_ok(sum(d.outcome == "other_category" for d in tables), len(tables), rate["other_category"])
    has = [d for d in draws if d.outcome != "miss"]  # type: ignore[union-attr]
    for flag in ("duplicate", "hallucinated"):
        assert _binom_ok(sum(getattr(d, flag) for d in has), len(has), rate[flag])
    wrong = [d for d in has if d.outcome != "correct"]
    assert _binom_ok(sum(d.true_also for d in wrong), len(wrong), rate["true_also"])
    # box quality: an IoU distribution with the Beta's mean, loose and tight in the flag's proportion
    correct = [d for d in has if d.outcome == "correct"]
    ious = [d.first_iou for d in correct]
    mean_dev = rate["box_a"] / (rate["box_a"] + rate["box_b"])
    assert sum(ious) / len(ious) == pytest.approx(1 - mean_dev, abs=0.02)
    assert min(ious) < 0.5 < 0.95 < max(ious)  # a spread, with a few bad boxes: not a constant
    assert _binom_ok(sum(d.box_mode == "loose" for d in correct), len(correct), rate["loose"])
    # wrong-instance boxes really are the other chair; hallucinations sit on no object
    for d in has:
        if d.outcome == "wrong_instance":
            assert d.candidate_ious[0] == 0.0
        if d.hallucinated:
            assert d.candidates[-1][1] == "hallucinated" and d.candidate_ious[-1] < 0.1
        assert [note for _, note in d.candidates][0] == d.outcome


def test_scale_zero_is_the_oracle_and_draws_are_deterministic(synth: tuple[Path, list[Mention]]) -> None:
    gt_path, mentions = synth
    ms = mentions[:300]
    img = Image.new("RGB", (W, H))
    recs = sorted({m.record_id for m in ms})
    per_rec = [[m for m in ms if m.record_id == r] for r in recs]
    oracle = OracleTagger(gt_path).tag([img] * len(recs), per_rec)
    clean = SimTagger(gt_path, noise_scale=0.0).tag([img] * len(recs), per_rec)
    assert [[(c.box_xyxy_px, c.mention_index) for c in cs] for cs in clean] == \
        [[(c.box_xyxy_px, c.mention_index) for c in cs] for cs in oracle]
    a = SimTagger(gt_path, seed=7).tag([img] * len(recs), per_rec)
    b = SimTagger(gt_path, seed=7).tag([img] * len(recs), list(per_rec))  # a fresh instance: same draws
    c = SimTagger(gt_path, seed=8).tag([img] * len(recs), per_rec)
    assert a == b and a != c
    # the verifier at scale 0 decides as the oracle does
    ov, sv = OracleVerifier(gt_path), SimVerifier(gt_path, noise_scale=0.0)
    gt = load_ground_truth(gt_path)
    for m, cand in zip(ms[:60], [x for per in a for x in per][:60]):
        cands = [cand.box_xyxy_px, gt[(m.record_id, m.turn, m.start, m.end)].box_xyxy_px]
        assert sv.verify(img, m, cands).choice == ov.verify(img, m, cands).choice


def test_verifier_rates_and_recorded_decisions(synth: tuple[Path, list[Mention]]) -> None:
    gt_path, mentions = synth
    gt = load_ground_truth(gt_path)
    ver = make_verifier("sim", gt_path=gt_path, seed=1)
    assert isinstance(ver, SimVerifier)
    img = Image.new("RGB", (W, H))
    rate = {k: v for k, (v, _) in SIM_RATES.items()}
    got: Counter[str] = Counter()
    n_only_right = n_wrong_shown = 0
    for k, m in enumerate(mentions):
        truth = gt[(m.record_id, m.turn, m.start, m.end)].box_xyxy_px
        miss = (truth[0] + 500, truth[1], truth[2] + 500, truth[3])  # IoU 0
        cands = [truth] if k % 2 else [miss, truth]
        v = ver.verify(img, m, cands)
        raw = json.loads(v.raw)
        got[raw["injected"]] += 1
        # the recorded decision is what the verdict did
        if raw["injected"] == "chose_right":
            assert box_iou(cands[v.choice], truth) >= 0.5
        elif raw["injected"] == "accepted_wrong":
            assert box_iou(cands[v.choice], truth) < 0.5
        else:
            assert v.choice is None
        n_only_right += k % 2
        n_wrong_shown += 1 - k % 2
    n = len(mentions)
    assert _binom_ok(got["refused"], n, rate["refuse"])
    assert _binom_ok(got["accepted_wrong"], n_wrong_shown, (1 - rate["refuse"]) * rate["accept_wrong"])
    assert _binom_ok(got["rejected_right"], n, (1 - rate["refuse"]) * (1 - rate["accept_wrong"] / 2)
                     * rate["reject_right"])
    # rewrites: ambiguous ones only where another object of the category is in view (the chairs)
    amb = Counter()
    for m in mentions[:900]:
        g = gt[(m.record_id, m.turn, m.start, m.end)]
        rw = ver.rewrite(img, m, g.box_xyxy_px)
        if json.loads(rw.raw)["injected"] == "ambiguous":
            amb[g.category] += 1
            assert rw.text in ("the chair", "the red chair", "the blue chair") and g.colour not in rw.text
    assert amb["table"] == 0 and _binom_ok(amb["chair"], 600, rate["ambiguous_rewrite"])


def test_bad_rates_are_refused(synth: tuple[Path, list[Mention]]) -> None:
    gt_path, _ = synth
    with pytest.raises(ValueError, match="miss must be in"):
        SimTagger(gt_path, rates={"miss": 1.5})
    with pytest.raises(ValueError, match="unknown sim rate"):
        SimTagger(gt_path, rates={"mis": 0.1})
    with pytest.raises(ValueError, match="noise_scale"):
        SimVerifier(gt_path, noise_scale=-1)
