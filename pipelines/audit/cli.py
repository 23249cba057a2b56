"""`gr3d audit`: the annotation-noise report, the human-review sheet and its score, perturbed copies.

    gr3d audit BUILD_DIR [--out REPORT_DIR] [--ground-truth FILE] [--no-intermediates] [--no-verify]
    gr3d audit sample BUILD_DIR [--n 200] [--seed S] [--out DIR]
    gr3d audit score SHEET [--json FILE]
    gr3d audit perturb BUILD_DIR --out DIR [--box-jitter SIGMA] [--drop P] [--swap P] [--seed S] [--overwrite]

The report form takes the build directly (no `report` word needed; `gr3d audit report BUILD` works
too). argparse cannot mix a positional directory with subcommands, so `audit` takes the rest of
the command line and parses it here. Imports only argparse at module level: `gr3d --help` stays fast.
Exit status (schemas.cli_errors): 0 done, 2 bad usage or a missing/unreadable input (one line naming the file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUBCOMMANDS = ("report", "sample", "score", "perturb")
_USAGE = """gr3d audit BUILD_DIR [--out REPORT_DIR] [--ground-truth FILE] [--error-gallery N] [options]
       gr3d audit sample BUILD_DIR [--n 200] [--seed S] [--out DIR]
       gr3d audit score SHEET [--json FILE]
       gr3d audit perturb BUILD_DIR --out DIR [--box-jitter SIGMA] [--drop P] [--swap P] [--seed S]"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit a build's annotation noise (report, review sheet, score, perturb)",
                       usage=_USAGE, add_help=False,
                       description="Annotation-noise audit of a built corpus. Run `gr3d audit --help` for the forms.")
    p.add_argument("-h", "--help", action="store_true", dest="audit_help", help="show the forms and options")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="the form and its arguments (see the forms above)")
    p.set_defaults(func=run)


def _count(text: str) -> int:
    """An integer >= 0 (argparse turns the ValueError into a usage error naming the option)."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gr3d audit", usage=_USAGE,
                                description="Annotation-noise audit of a built corpus (docs/audit.md).")
    # prog given: argparse would otherwise build it from the multi-line usage (a garbled sub-usage line).
    sub = p.add_subparsers(dest="audit_command", metavar="FORM", required=True, prog="gr3d audit")
    r = sub.add_parser("report", help="(default form) HTML report + audit.json",
                       description="Write REPORT_DIR/report.html (one self-contained file) and REPORT_DIR/audit.json.")
    r.add_argument("build_dir", type=Path, metavar="BUILD_DIR", help="build directory (holds shards/)")
    r.add_argument("--out", type=Path, default=None, help="report directory (default: BUILD_DIR/audit/report)")
    r.add_argument("--ground-truth", type=Path, default=None,
                   help="sample-world ground_truth.json (default: found from the build's config, if any)")
    r.add_argument("--no-intermediates", action="store_true",
                   help="do not read intermediate/ (tagger/verifier agreement is then not measured)")
    r.add_argument("--no-verify", action="store_true", help="skip `gr3d shards verify` of the build (faster, trusting)")
    r.add_argument("--gallery", type=int, default=12, help="gallery samples (default 12)")
    r.add_argument("--seed", type=int, default=0, help="seed of the gallery's stratified draw (default 0)")
    r.add_argument("--error-gallery", type=_count, default=4, metavar="N",
                   help="caught / missed / lost errors drawn per stratum, N // 2 correct ones (0: counts only)")

    s = sub.add_parser("sample", help="stratified sample of boxes for human review (CSV/Parquet + crops)",
                       description="Draw N boxes stratified by corpus and category; write sheet.csv, sheet.parquet, "
                       "crops/ and README.txt for a reviewer to mark.")
    s.add_argument("build_dir", type=Path, metavar="BUILD_DIR", help="build directory (holds shards/)")
    s.add_argument("--n", type=int, default=200, help="boxes to sample (default 200, as in the paper)")
    s.add_argument("--seed", type=int, default=0, help="seed of the stratified draw")
    s.add_argument("--out", type=Path, default=None, help="sheet directory (default: BUILD_DIR/audit/review_seedS)")
    s.add_argument("--no-verify", action="store_true", help="skip `gr3d shards verify` of the build")

    c = sub.add_parser("score", help="accuracy + Wilson 95%% interval of a marked sheet",
                       description="Score a marked review sheet (sheet.csv, sheet.parquet or their directory).")
    c.add_argument("sheet", type=Path, metavar="SHEET", help="marked sheet.csv, sheet.parquet or their directory")
    c.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")

    t = sub.add_parser("perturb", help="copy of a build with controlled, recorded box noise",
                       description="Write a perturbed copy of a build (box jitter, dropped and swapped annotations), "
                       "recorded per unit in OUT/perturbations.parquet and in OUT/manifest.json.")
    t.add_argument("build_dir", type=Path, metavar="BUILD_DIR", help="build directory to copy")
    t.add_argument("--out", type=Path, required=True, help="directory of the perturbed build")
    t.add_argument("--box-jitter", type=float, default=0.0, metavar="SIGMA",
                   help="std of each box coordinate's noise, as a fraction of the box width/height (default 0)")
    t.add_argument("--drop", type=float, default=0.0, metavar="P", help="probability of dropping an annotation")
    t.add_argument("--swap", type=float, default=0.0, metavar="P", help="probability of swapping a box with another's")
    t.add_argument("--seed", type=int, default=0, help="seed of the noise draw")
    t.add_argument("--overwrite", action="store_true", help="replace a build already in --out")
    t.add_argument("--no-verify", action="store_true", help="skip verifying the source and the copy")
    return p


def _argv(rest: list[str]) -> list[str]:
    if rest and rest[0] not in SUBCOMMANDS and rest[0] not in ("-h", "--help"):
        return ["report", *rest]
    return rest or ["--help"]


def run(args: argparse.Namespace) -> int:
    rest = list(args.argv)
    from pipelines.cli import DefaultsHelpFormatter, iter_parsers
    from schemas.cli_errors import EXIT_USAGE

    parser = _parser()
    for sp in iter_parsers(parser):
        sp.formatter_class = DefaultsHelpFormatter
    ns = parser.parse_args(["--help"] if getattr(args, "audit_help", False) else _argv(rest))
    from pipelines.audit.load import AuditInputError
    from pipelines.audit.perturb import PerturbError
    from pipelines.audit.review import ScoreError

    try:
        return _dispatch(ns)
    except (AuditInputError, PerturbError, ScoreError) as e:
        print(f"gr3d audit {ns.audit_command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE


def _dispatch(ns: argparse.Namespace) -> int:
    if ns.audit_command == "report":
        from pipelines.audit.report import write_report

        out = ns.out or ns.build_dir / "audit" / "report"
        doc = write_report(ns.build_dir, out, ground_truth=ns.ground_truth, verify=not ns.no_verify,
                           intermediates=not ns.no_intermediates, gallery_size=ns.gallery, seed=ns.seed,
                           error_gallery=ns.error_gallery)
        f = doc["funnel"]
        print(f"report: {out / 'report.html'}\naudit.json: {out / 'audit.json'}")
        print(f"inputs {f['n_input']}  written {f['n_written']}  reject rows {f['n_reject_rows']}  "
              f"figures {len(doc['figures'])}")
        if f.get("dropped_annotations"):
            print("annotations dropped inside written samples: "
                  + ", ".join(f"{k}={v}" for k, v in f["dropped_annotations"].items()))
        g = (doc.get("agreement") or {}).get("ground_truth")
        if g:
            def pct(v: float | None) -> str:
                return "n/a" if v is None else f"{v:.4f}"

            print(f"vs ground truth: precision@0.5 {pct(g['precision'])}  recall@0.5 {pct(g['recall'])}  "
                  f"({g['n_written']} written, {g['n_gt']} ground-truth mentions)")
        eg = doc.get("error_gallery")
        if eg:
            print("errors vs ground truth: " + "  ".join(f"{k} {v}" for k, v in eg["counts"].items())
                  + f"  (drawn: {sum(1 for c in eg['shown'] if c['png_bytes'])})")
        amb = (doc.get("rewrite") or {}).get("ambiguity")
        if amb and amb["n"]:
            print(f"descriptions: ambiguous {amb['n_ambiguous']}/{amb['n']}  misdescribed {amb['n_misdescribed']}"
                  f"/{amb['n']}")
        return 0
    if ns.audit_command == "sample":
        from pipelines.audit.review import sample_for_review

        out = ns.out or ns.build_dir / "audit" / f"review_seed{ns.seed}"
        s = sample_for_review(ns.build_dir, out, n=ns.n, seed=ns.seed, verify=not ns.no_verify)
        print(f"sampled {s['sampled']} of {s['units']} boxes in {s['strata']} strata -> {s['files']['csv']}")
        print(f"mark the verdict column (1 correct, 0 wrong, blank unsure), then: gr3d audit score {s['files']['csv']}")
        return 0
    if ns.audit_command == "score":
        from pipelines.audit.review import score_sheet

        r = score_sheet(ns.sheet)
        print(f"accuracy {r['correct']}/{r['marked']} = {100 * r['accuracy']:.1f}%  "
              f"(95% CI {100 * r['ci_low']:.1f}% - {100 * r['ci_high']:.1f}%, Wilson); {r['unmarked']} rows unmarked")
        if r["weighted"]:
            w = r["weighted"]
            print(f"stratum-weighted {100 * w['accuracy']:.1f}% (95% CI {100 * w['ci_low']:.1f}% - "
                  f"{100 * w['ci_high']:.1f}%)")
        if ns.json:
            ns.json.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
        return 0
    if ns.audit_command == "perturb":
        from pipelines.audit.perturb import perturb_build

        s = perturb_build(ns.build_dir, ns.out, box_jitter=ns.box_jitter, drop=ns.drop, swap=ns.swap, seed=ns.seed,
                          overwrite=ns.overwrite, verify=not ns.no_verify)
        c = s["counts"]
        print(f"perturbed copy: {ns.out}  units {s['units']}  dropped {c['dropped']}  swapped {c['swapped']}  "
              f"jittered {c['jittered']}  IoU<0.5 vs original {c['iou_below_0_5']}")
        print(f"per-unit record: {Path(ns.out) / s['file']}")
        return 0
    raise ValueError(f"unknown audit form {ns.audit_command!r}")  # pragma: no cover - argparse guards
