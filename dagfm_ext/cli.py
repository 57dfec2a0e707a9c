"""Command line: ``dagfm-ext run`` (the distillation pipeline), ``preprocess``, ``export``, ``predict``, ``bench``.

    python -m dagfm_ext run                       # whole pipeline on MovieLens-100K, CPU
    python -m dagfm_ext run --dataset criteo:train.txt --teacher cin --interaction outer
    python -m dagfm_ext preprocess --dataset criteo:train.txt   # encode once into the cache
    python -m dagfm_ext run --output runs/x --resume   # continue a killed run
    torchrun --nproc_per_node=2 -m dagfm_ext run --output runs/x   # DistributedDataParallel
    python -m dagfm_ext export --checkpoint runs/x --output student.pt2
    python -m dagfm_ext export --checkpoint runs/x --onnx student.onnx --triton model_repository
    python -m dagfm_ext predict --model student.pt2 --input rows.tsv --output preds.csv
    python -m dagfm_ext convert-checkpoint --trust-pickle old/checkpoint.pt new.pt   # older format
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


# Errors a user can cause, each reported as one line and exit status 2: ValueError (a bad value
# or a bad file: the message names it), OSError (the filesystem: a path that is missing, a
# directory, unreadable) and RuntimeError (torch at run time: out of memory, a device that cannot
# be used). Any other exception is a bug in dagfm_ext and keeps its traceback; so do these with
# DAGFM_EXT_TRACEBACK=1.
USER_ERRORS = (ValueError, OSError, RuntimeError)


def _report_error(command: str, e: BaseException) -> int:
    if os.environ.get("DAGFM_EXT_TRACEBACK", "0") not in ("", "0"):
        raise e
    if isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.filename}: {e.strerror or e}"
    else:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    print(f"dagfm-ext {command}: error: {msg}", file=sys.stderr)
    return 2


def _dataset(value: str) -> str:
    from .data.names import check_dataset
    try:
        return check_dataset(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_list(value: str):
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints such as 256,128, got {value!r}")
    return out


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from .config import RunConfig, STUDENTS
    from .data.command import add_cache_argument
    from .reference import INTERACTIONS
    from .precision import add_precision_argument
    from .teachers import teacher_names
    d = RunConfig()
    p.add_argument("--dataset", type=_dataset, default=d.dataset,
                   metavar="{ml-100k,synthetic,criteo:PATH,avazu:PATH,spec:SPEC.json}",
                   help="data to train on (default: %(default)s, downloaded and cached on first use)")
    p.add_argument("--teacher", choices=teacher_names(), default=d.teacher, help="teacher network (default: %(default)s)")
    p.add_argument("--student", choices=STUDENTS, default=d.student,
                   help="student network; 'fm' is the plain-FM baseline (default: %(default)s)")
    p.add_argument("--interaction", choices=INTERACTIONS, default=d.interaction, help="DAGFM edge type (default: %(default)s)")
    p.add_argument("--depth", type=int, default=d.depth, help="student DAG depth L (default: %(default)s)")
    p.add_argument("--teacher-depth", type=int, default=d.teacher_depth, help="CrossNet layers (default: %(default)s)")
    p.add_argument("--cin-layers", type=_int_list, default=d.cin_layers, help="CIN layer sizes (default: 128,128)")
    p.add_argument("--mlp", type=_int_list, default=d.mlp, help="DAGFM+ MLP sizes (default: 256,128)")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="embedding size D (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="Adam weight decay (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="distillation BCE weight (default: %(default)s)")
    p.add_argument("--beta", type=float, default=d.beta, help="distillation logit-MSE weight (default: %(default)s)")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs, help="epoch limit per phase (default: %(default)s)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="early stop after this many epochs without a better val AUC (default: %(default)s)")
    p.add_argument("--min-count", type=int, default=d.min_count,
                   help="Criteo: categories seen fewer times become out-of-vocabulary (default: %(default)s)")
    p.add_argument("--synthetic-size", type=int, default=d.synthetic_size, help="rows of --dataset synthetic")
    add_cache_argument(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for init, split and shuffling (default: %(default)s)")
    p.add_argument("--output", default=d.output, metavar="DIR",
                   help="run directory: checkpoint, logs, report.json (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output after its last finished epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_precision_argument(p, d.precision)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dagfm-ext", description="KD-DAGFM: distil a CTR teacher into a fast DAGFM student.")
    sub = parser.add_subparsers(dest="command", metavar="{run,preprocess,export,predict,bench,convert-checkpoint}")
    run = sub.add_parser("run", help="train teacher, distil, finetune; print the teacher-vs-student table "
                                     "(under torchrun: one DDP process per rank)")
    _add_run_arguments(run)
    sub.add_parser("preprocess", help="encode a raw dataset into the cache ahead of 'run'", add_help=False)
    # export and predict have their own parsers (see _serving): predict must not import the training code.
    sub.add_parser("export", help="write a finished run's student as a torch.export program (.pt2) or ONNX graph", add_help=False)
    sub.add_parser("predict", help="score raw TSV/CSV rows with an exported student", add_help=False)
    convert = sub.add_parser("convert-checkpoint", help="rewrite a checkpoint of an older dagfm-ext in the "
                             "present format (reading it unpickles: only for files you trust)")
    convert.add_argument("old", metavar="OLD", help="the old checkpoint.pt (or its run directory)")
    convert.add_argument("new", metavar="NEW", help="where to write the converted checkpoint")
    convert.add_argument("--trust-pickle", action="store_true", required=True,
                         help="confirm that OLD comes from a source you trust: reading it can run any code it holds")
    # bench's own options are added only when it runs (the module is imported lazily).
    sub.add_parser("bench", help="benchmark the fused op (see 'dagfm-ext bench --help')", add_help=False)
    return parser


def _bench(argv: Sequence[str]) -> int:
    if "--latency" in argv:  # the serving-latency tool has options of its own
        from .bench import latency
        return latency.main([a for a in argv if a != "--latency"])
    try:
        from . import bench
    except Exception as e:  # noqa: BLE001  (any failure to import is reported the same way)
        print(f"dagfm-ext bench: the benchmark module could not be loaded: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="dagfm-ext bench", description="Benchmarks of the fused DAGFM op.")
    bench.add_arguments(parser)
    return int(bench.main(parser.parse_args(list(argv))) or 0)


def _given_options(run_argv: Sequence[str]) -> set:
    """The run options set on the command line (not left at their defaults)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_run_arguments(parser)
    unset = object()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {k for k, v in vars(parser.parse_args(list(run_argv))).items() if v is not unset}


def _run(args: argparse.Namespace, given: set) -> int:
    from . import distributed
    from .config import RunConfig
    from .distill import Pipeline
    from .report import format_table
    try:
        # Under torchrun this joins the process group; the device becomes cuda:LOCAL_RANK on GPUs.
        device = distributed.init_from_env(args.device or _default_device())
        cfg = RunConfig(dataset=args.dataset, teacher=args.teacher, student=args.student,
                        interaction=args.interaction, depth=args.depth, teacher_depth=args.teacher_depth,
                        cin_layers=args.cin_layers, mlp=args.mlp, embed_dim=args.embed_dim,
                        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, alpha=args.alpha,
                        beta=args.beta, max_epochs=args.max_epochs, patience=args.patience, seed=args.seed,
                        device=device, min_count=args.min_count, synthetic_size=args.synthetic_size,
                        cache_dir=args.cache_dir or "", output=args.output, progress=not args.quiet,
                        precision=args.precision)
        given = {"progress" if g == "quiet" else g for g in given}
        report = Pipeline(cfg, resume=args.resume, given=given).run()
    except USER_ERRORS as e:
        return _report_error("run", e)
    finally:
        distributed.shutdown()
    if report is not None:  # only rank 0 reports
        print(format_table(report))
        print(f"report: {args.output}/report.json")
    return 0


def _serving(command: str, argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"dagfm-ext {command}")
    if command == "export":
        parser.description = ("Write the finetuned student of a finished run (embeddings, schema, field mixing, "
                              "propagation, readout) as a torch.export program (--output) and/or a standard-op ONNX graph "
                              "(--onnx), both with a dynamic batch dimension.")
        parser.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory (or its checkpoint.pt)")
        parser.add_argument("--output", metavar="FILE", help="the .pt2 file to write")
        parser.add_argument("--aoti", metavar="FILE", help="also write an AOTInductor package (compiled for this "
                            "CPU; for C++ serving, see examples/cpp/serve_student.cpp)")
        parser.add_argument("--onnx", metavar="FILE", help="write the student as a standard-op ONNX graph for "
                            "onnxruntime (needs the 'onnx' extra)")
        parser.add_argument("--triton", metavar="DIR", help="with --onnx: also a Triton model repository in DIR")
    else:
        parser.description = "Score raw rows with a student written by 'dagfm-ext export'."
        parser.add_argument("--model", required=True, metavar="FILE",
                            help="the .pt2 or .onnx written by 'dagfm-ext export'")
        parser.add_argument("--input", required=True, metavar="ROWS",
                            help="TSV/CSV rows: a header naming the fields, or the fields in order with an "
                                 "optional leading label column (Criteo format)")
        parser.add_argument("--output", metavar="FILE", help="CSV of logit,probability (default: stdout)")
    args = parser.parse_args(list(argv))
    if command == "export" and not (args.output or args.onnx):
        parser.error("expected --output FILE.pt2, --onnx FILE.onnx or both")
    if command == "export" and ((args.aoti and not args.output) or (args.triton and not args.onnx)):
        parser.error("--aoti needs --output, --triton needs --onnx")
    from . import serving
    try:
        if command == "export":
            from . import export  # the training side: only export loads it
            if args.output:
                export.export_checkpoint(args.checkpoint, args.output, args.aoti)
            if args.onnx:
                export.export_onnx_checkpoint(args.checkpoint, args.onnx, args.triton)
            print("exported: " + ", ".join(f for f in (args.output, args.aoti, args.onnx, args.triton) if f))
        elif args.output:
            from .fileio import atomic_write_stream  # no partial file if a row is malformed
            scored = []
            atomic_write_stream(args.output, lambda f: scored.append(serving.predict_file(args.model, args.input, f)))
            print(f"scored {len(scored[0])} rows: {args.output}", file=sys.stderr)
        else:
            serving.predict_file(args.model, args.input, sys.stdout)
    except USER_ERRORS as e:
        return _report_error(command, e)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] == "preprocess":
        from .data.command import main as preprocess
        return preprocess(argv[1:])
    if argv and argv[0] in ("export", "predict"):
        return _serving(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "convert-checkpoint":
        from .checkpoint import convert_checkpoint
        try:
            print(f"converted: {convert_checkpoint(args.old, args.new, trust_pickle=args.trust_pickle)}")
        except USER_ERRORS as e:
            return _report_error("convert-checkpoint", e)
        return 0
    return _run(args, _given_options(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
