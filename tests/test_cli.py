"""The single `gr3d` script: every command has a working --help, and --help imports nothing heavy;
the conventions of every command: --version, defaults and help text, one-line input errors with exit 2."""

import subprocess
import sys

import pytest

from pipelines.cli import build_parser, main

COMMANDS = [
    [], ["demo"], ["sample-world"], ["shards"], ["shards", "verify"], ["build"], ["build", "det3d"],
    ["build", "pointmap"], ["build", "pointmaps"], ["build", "cot"], ["audit"], ["train"], ["eval"], ["eval", "det3d"],
    ["eval", "ground2d"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "gr3d")
def test_help_of_every_command(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main([*argv, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "usage: gr3d" in out and len(out) > 200


def test_top_level_lists_every_command():
    text = build_parser().format_help()
    for name in ["demo", "sample-world", "build", "shards", "audit", "train", "eval"]:
        assert name in text


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom pipelines.cli import build_parser\nbuild_parser().format_help()\n"
            "heavy = [m for m in ('torch', 'ray', 'open3d', 'transformers', 'apache_beam') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"gr3d --help imported {out}"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- conventions


def _all_parsers():
    """Every parser of the tree, plus `gr3d audit`'s own (it parses its forms itself)."""
    import argparse as ap

    from pipelines.audit.cli import _parser as audit_parser
    from pipelines.cli import iter_parsers

    root = build_parser()
    audit = audit_parser()
    from pipelines.engine.build_cli import BUILDER_MODULES, registered_builders

    # builders other tests register (toy executors' builders) are not part of the shipped CLI
    foreign = {f"gr3d build {n}" for n, spec in registered_builders().items()
               if spec.make.__module__ not in BUILDER_MODULES}
    skip = (ap._HelpAction, ap._VersionAction, ap._SubParsersAction)
    return root, [(p, a) for p in [*iter_parsers(root), *iter_parsers(audit)] for a in p._actions
                  if not isinstance(a, skip) and p.prog not in foreign]


def test_version(capsys):
    from pipelines.cli import package_version

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"gr3d {package_version()}" and out.split()[1][0].isdigit()


def test_every_option_has_help_and_shows_its_default():
    from pipelines.cli import DefaultsHelpFormatter

    _, actions = _all_parsers()
    assert len(actions) > 100
    no_help = [f"{p.prog} {a.option_strings or a.dest}" for p, a in actions if not (a.help or "").strip()]
    assert no_help == []
    hidden = [f"{p.prog} {a.option_strings}" for p, a in actions
              if a.option_strings and not a.required
              and "default" not in DefaultsHelpFormatter(p.prog)._get_help_string(a).lower()]
    assert hidden == []
    # and the formatter is the one every parser of `gr3d` uses: the text is what --help prints
    text = build_parser()._subparsers._group_actions[0].choices["build"]._subparsers._group_actions[0] \
        .choices["cot"].format_help()
    assert "--tagger-batch-size TAGGER_BATCH_SIZE" in text and "(default: 8)" in text


def test_audit_report_help_has_one_clean_usage_line(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "report", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: gr3d audit report [-h]")
    assert "sample BUILD_DIR" not in out.split("\n\n")[0]  # the forms list is not pasted into the usage


def test_one_metavar_per_thing():
    _, actions = _all_parsers()
    build_dirs = {a.metavar for p, a in actions if a.dest in ("build_dir", "shards")}
    data_roots = {a.metavar for p, a in actions if a.dest == "data_root"}
    assert build_dirs == {"BUILD_DIR"} and data_roots == {"DIR"}


def test_pointmap_builder_name_and_old_alias():
    sub = build_parser()._subparsers._group_actions[0].choices["build"]._subparsers._group_actions[0]
    assert "pointmap" in sub.choices and sub.choices["pointmaps"] is sub.choices["pointmap"]
    args = build_parser().parse_args(["build", "pointmaps", "--out", "x", "--source", "rgbd", "--rgbd", "y"])
    assert args.builder_spec.name == "pointmap"


def test_train_help_lists_config_keys_with_types_and_defaults(capsys):
    from model.train_config import config_keys

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out.split("config keys")[1]
    keys = config_keys()
    assert len(keys) > 30
    for key, tp, default in keys:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"--{key} "))
        assert tp in line and f"default: {default!r}" in line
    assert any(k == "optim.lr" and t == "float | None" for k, t, _ in keys)


MISSING_INPUTS = [
    (["eval", "det3d", "--gt", "{m}/gt.json", "--predictions", "{m}/p.json", "--out", "{t}/o"],
     "gr3d eval det3d: error: {m}/gt.json"),
    (["eval", "ground2d", "--predictions", "{m}/p.json", "--gt", "{m}/g.json"], "{m}/p.json"),
    (["build", "pointmap", "--source", "rgbd", "--rgbd", "{m}", "--out", "{t}/b", "--executor", "local", "--quiet"],
     "{m}"),
    (["shards", "show", "{m}", "KEY"], "gr3d shards show: error: {m}: build directory not found"),
    (["shards", "verify", "{m}"], "{m}: build directory not found"),
    (["audit", "{m}"], "{m}"),
    (["audit", "score", "{m}"], "{m}"),
    (["train", "--config", "{m}/c.yaml"], "{m}/c.yaml"),
]


@pytest.mark.parametrize("argv,names", MISSING_INPUTS, ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else "")
def test_missing_input_is_one_line_and_exit_2(argv, names, tmp_path, capsys):
    m, t = str(tmp_path / "missing"), str(tmp_path)
    rc = main([a.format(m=m, t=t) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("gr3d ") and "Traceback" not in err, err
    assert names.format(m=m) in err
