"""`gr3d train --config FILE [--resume auto|PATH|none] [--KEY VALUE ...]`.

Registers the command only; torch and the trainer are imported when it runs, so `gr3d --help` stays fast.
`--config` takes a YAML path or the name of a packaged config (`tiny`, `gr3d-8b-stage1`, `gr3d-8b-stage2`).
Every other `--dotted.key value` overrides one field of `model.train_config.TrainConfig`, type-checked;
an unknown key is an error naming the close matches. Under torchrun every rank runs this same command.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parser", "run_train"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `gr3d train`."""
    from model.train_config import config_keys_help  # dataclasses only: no torch

    p = subparsers.add_parser(
        "train", help="train GR3D from built shards (stage 1 or 2; CPU, one GPU, or torchrun DDP/FSDP)",
        description="Train GR3D. Overrides: any config field as --section.key VALUE, e.g. --optim.lr 1e-4 "
        "--data.batch_size 4 --max_steps 300 --out runs/x. Multi-GPU: torchrun --nproc_per_node N -m "
        "pipelines.cli train ... (or the gr3d script path).",
        epilog=config_keys_help()
        + "\n\nOutputs in OUT: checkpoints/step_NNNNNN/, metrics.jsonl, loss.png, final/ (for gr3d eval).",
    )
    p.add_argument("--config", required=True, metavar="FILE",
                   help="YAML config, or a packaged name: tiny | gr3d-8b-stage1 | gr3d-8b-stage2")
    p.add_argument("--resume", default="none", metavar="auto|PATH|none",
                   help="auto: newest complete checkpoint in OUT/checkpoints (fresh start if none); "
                   "PATH: that checkpoint directory; none (default): fresh start, refused if OUT has checkpoints")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run_train)
    p.__class__ = _OverridesParser  # keep `--section.key VALUE` pairs instead of failing on them


class _OverridesParser(argparse.ArgumentParser):
    """Collects the arguments argparse does not know into `args.overrides` (in order), for the config."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        ns, extras = super().parse_known_args(args, namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + list(extras)
        return ns, []


def run_train(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    from model.train_config import ConfigError, config_to_dict, load_config, parse_override_args

    extra = overrides if overrides is not None else list(getattr(args, "overrides", None) or [])
    try:
        cfg = load_config(args.config, parse_override_args(extra))
    except ConfigError as e:
        print(f"gr3d train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the tokenizer ran
    from model.train import train

    if cfg.threads > 0:  # a process setting: the command applies it (tests call train() in their own process)
        import torch

        torch.set_num_threads(cfg.threads)
    from shards.interrupt import stop_on_signals

    try:
        with stop_on_signals():  # SIGINT/SIGTERM: `Interrupted`, told by `gr3d` in one line (130/143)
            train(cfg, resume=args.resume)
    except (FileExistsError, FileNotFoundError) as e:  # run-directory and path mistakes: no traceback
        print(f"gr3d train: {e}", file=sys.stderr)
        return 2
    return 0
