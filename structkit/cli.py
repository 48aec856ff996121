"""Command line: ``structkit run CONFIG`` and the stages ``train | compress | export | bench | inspect``.

Only parses arguments and calls :mod:`structkit.pipeline`. Without ``--debug`` an error in the input (a bad
config, a missing file, a run folder in the wrong state) prints one message to stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
#: what counts as a user-facing error (pydantic's ValidationError is a ValueError); anything else is a bug and
#: keeps its traceback
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="print only errors and the final summary line")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="extend", nargs="+", default=[],
                        help="override a config value, e.g. --set optimizer.lr=0.02 structure.0.lam=5e-4 "
                             "(values are YAML: 8, 1e-3, null, [1, 64])")
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("config", type=Path, help="YAML config (see configs/ and docs/configuration.md)")
    training.add_argument("--out", type=Path, help="output folder (default: runs/<config name>)")
    training.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument("out", type=Path, help="output folder of a run (holds config.yaml and checkpoints/)")

    parser = argparse.ArgumentParser(prog="structkit", description="Train with a declared structure, prune the "
                                     "exact zeros, verify, export to ONNX and measure the speedup.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[training, common], help="the whole pipeline: train, compress, export, bench, report")
    sub.add_parser("train", parents=[training, common], help="train only (checkpoints, metrics.jsonl)")
    sub.add_parser("compress", parents=[folder, common], help="prune a trained run (slim.pt), verified")
    sub.add_parser("export", parents=[folder, common], help="export dense and slim models to ONNX, checked")
    sub.add_parser("bench", parents=[folder, common], help="time dense.onnx and slim.onnx in ONNX Runtime")
    sub.add_parser("inspect", parents=[common], help="print the config and the groups its rules give") \
        .add_argument("config", type=Path, help="YAML config")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import distributed
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("structkit: interrupted; the last complete checkpoint is kept (continue with --resume).", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if args.debug:
            raise
        if _rank() == 0:  # under torchrun every rank meets the same error: say it once
            print(f"structkit: error: {err}", file=sys.stderr)
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        distributed.finish()


def _dispatch(args: argparse.Namespace) -> int:
    from . import pipeline
    from .report import summary_line

    log = pipeline.Log(args.quiet)
    started = time.perf_counter()
    if args.command == "inspect":
        print(pipeline.inspect(args.config, args.overrides))
        return 0
    if args.command in ("run", "train"):
        from . import distributed
        config = pipeline.load_config(args.config, args.overrides)
        # joins torchrun's process group when there is one (a no-op otherwise); the backend follows the device
        distributed.init(config.schedule.device)
        out = args.out or Path("runs") / args.config.stem
        if args.command == "train":
            with pipeline.quiet_warnings(args.quiet):
                pipeline.train(config, out, resume=args.resume, log=log)
            if distributed.is_main():
                print(f"structkit: trained {out} ({time.perf_counter() - started:.0f} s)")
            return 0
        report = pipeline.run(config, out, resume=args.resume, log=log)
        if not distributed.is_main():
            return 0
        print(summary_line(report) + f" (this command: {time.perf_counter() - started:.0f} s); report: {out / 'report.md'}")
        return 0
    stage = getattr(pipeline, args.command)
    with pipeline.quiet_warnings(args.quiet):
        stage(args.out, overrides=args.overrides, log=log)
    print(f"structkit: {args.command} done; report: {args.out / 'report.md'}")
    return 0


def _rank() -> int:
    """This process's rank: the process group's, or torchrun's ``RANK`` before the group is joined."""
    import os
    from . import distributed
    if distributed.is_distributed():
        return distributed.rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
