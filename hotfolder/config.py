"""Typed, immutable configuration loaded from YAML and validated up front.

Every problem is reported as one :class:`ConfigError` naming the key and the fix, before anything
starts. Relative paths are taken relative to the folder of the config file, so the daemon behaves
the same whatever its working directory.
"""

from __future__ import annotations

import grp
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hotfolder import imaging, naming, publish, recipes

CONFIG_ENV = "HOTFOLDER_CONFIG"
DEFAULT_CONFIG = Path("config.yaml")
# The models `model.name` and `--model` accept; `hotfolder weights fetch NAME` obtains each.
MODELS = ("u2netp", "u2net")
# The weights folder of the installation (the checkout, for an editable install): a model's
# weights are found there when the config names no file, wherever the command runs.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ORIGINALS = ("move", "delete")
T = TypeVar("T")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "u2netp"
    weights: Path = Path("weights/u2netp.safetensors")
    device: str = "auto"
    precision: str = "auto"
    flip_average: bool = False
    cpu_threads: int = 0  # images run side by side on the CPU; 0: one per core
    cuda_graphs: bool = True  # replay the model from CUDA graphs captured during warm-up
    compile: bool = False  # torch.compile: faster on a GPU, minutes at the first start
    compile_cache: Path = Path()  # where compiled kernels are kept between starts
    runtime: str = "auto"  # torch, onnxruntime, or auto (see hotfolder.runtime.choose)
    onnx_cache: Path = Path()  # where the model exported for ONNX Runtime is kept


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 16
    max_wait_ms: int = 20


@dataclass(frozen=True)
class LimitsConfig:
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    max_bytes: int = imaging.DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class InboxConfig:
    name: str
    path: Path
    outbox: Path
    done: Path | None
    errors: Path
    originals: str = "move"
    recursive: bool = True
    settle_ms: int = 1000
    polling: bool = False
    # How long a file that may still be arriving (open in a process, or looking cut short) is
    # waited for while unchanged, before it is taken as it is (and refused if cut short).
    incomplete_grace_ms: int = 60_000
    outputs: tuple[recipes.Output, ...] = (recipes.Output(kind=recipes.Kind.CUTOUT),)
    # Two different inputs whose outputs would share a name (item.jpg and item.png).
    collisions: naming.Collision = naming.Collision.SUFFIX
    permissions: publish.Permissions = publish.DEFAULT_PERMISSIONS


@dataclass(frozen=True)
class DaemonConfig:
    scan_interval_ms: int = 10_000  # listing the inboxes: catches what events missed
    drain_timeout_ms: int = 30_000  # SIGTERM: time to finish the in-flight batch
    workers: int = 0  # decode and encode threads each; 0: one per CPU core
    max_attempts: int = 3  # a file that fails (or crashes the daemon) this often goes to errors/
    stall_timeout_ms: int = 120_000  # a stage that has not stepped for this long is unhealthy


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9108"
    thumbnails_mb: int = 512  # the status page's pictures, beside the journal; 0: none


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    inboxes: tuple[InboxConfig, ...] = ()
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    journal: Path = Path("data/journal.sqlite3")
    source: Path | None = None


def find_config(explicit: Path | None) -> Path:
    """``--config``, else ``$HOTFOLDER_CONFIG``, else ``./config.yaml``."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CONFIG_ENV)
    return Path(from_env) if from_env else DEFAULT_CONFIG


def load(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (pass --config FILE or set ${CONFIG_ENV})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse(raw if raw is not None else {}, base=path.resolve().parent, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse(raw: Any, base: Path, source: Path | None = None) -> Config:
    top = _mapping(raw, "the top level")
    _known(top, "", {"model", "batching", "limits", "inboxes", "daemon", "metrics", "journal"})
    inboxes = tuple(
        _inbox(item, f"inboxes[{i}]", base) for i, item in enumerate(_list(top, "inboxes"))
    )
    _check_inboxes(inboxes)
    journal = _path(top.get("journal", str(Config.journal)), "journal", base)
    _check_journal(journal, inboxes)
    return Config(
        model=_model(top.get("model", {}), base),
        batching=_batching(top.get("batching", {})),
        limits=_limits(top.get("limits", {})),
        inboxes=inboxes,
        metrics=_metrics(top.get("metrics", {})),
        daemon=_daemon(top.get("daemon", {})),
        journal=journal,
        source=source,
    )


# int8-mixed: u2netp's costliest convolutions in int8 on ONNX Runtime (hotfolder/quantized.py).
INT8_MIXED = "int8-mixed"
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "bf16-mixed", INT8_MIXED)
MODEL_KEYS = {
    "name", "weights", "device", "precision", "flip_average", "cpu_threads", "cuda_graphs",
    "compile", "compile_cache", "runtime", "onnx_cache",
}  # fmt: skip


def _model(raw: Any, base: Path) -> ModelConfig:
    section = _mapping(raw, "model")
    _known(section, "model", MODEL_KEYS)
    defaults = ModelConfig()
    name = _get(section, "model.name", str, defaults.name)
    if name not in MODELS:
        raise ConfigError(f"model.name: {name!r} is not one of {', '.join(MODELS)}")
    weights = section.get("weights", str(default_weights(name)))
    precision = _get(section, "model.precision", str, defaults.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    device = _get(section, "model.device", str, defaults.device)
    compile_ = _get(section, "model.compile", bool, defaults.compile)
    runtime = _get(section, "model.runtime", str, defaults.runtime)
    _check_runtime(runtime, device, precision, compile_)
    if precision == INT8_MIXED and name != "u2netp":
        raise ConfigError(
            f"model.precision: {INT8_MIXED} is made for u2netp only; model {name!r} runs fp32 "
            "on the CPU"
        )
    return ModelConfig(
        name=name,
        weights=_path(weights, "model.weights", base),
        device=device,
        precision=precision,
        flip_average=_get(section, "model.flip_average", bool, defaults.flip_average),
        cpu_threads=_non_negative(section, "model.cpu_threads", defaults.cpu_threads),
        cuda_graphs=_get(section, "model.cuda_graphs", bool, defaults.cuda_graphs),
        compile=compile_,
        compile_cache=_path(
            section.get("compile_cache", str(default_compile_cache())), "model.compile_cache", base
        ),
        runtime=runtime,
        onnx_cache=_path(
            section.get("onnx_cache", str(default_onnx_cache())), "model.onnx_cache", base
        ),
    )


def _check_runtime(runtime: str, device: str, precision: str, compile_: bool) -> None:
    if runtime not in ("auto", "torch", "onnxruntime"):
        raise ConfigError(f"model.runtime: {runtime!r} is not one of auto, torch, onnxruntime")
    if runtime == "onnxruntime" and device not in ("auto", "cpu"):
        raise ConfigError(f"model.runtime: onnxruntime runs on the CPU; model.device is {device!r}")
    if runtime == "onnxruntime" and precision not in ("auto", "fp32", INT8_MIXED):
        raise ConfigError(
            f"model.runtime: onnxruntime runs fp32 or {INT8_MIXED}; model.precision "
            f"{precision!r} needs torch"
        )
    if precision == INT8_MIXED and runtime == "torch":
        raise ConfigError(
            f"model.precision: {INT8_MIXED} runs on ONNX Runtime; set model.runtime to auto or "
            "onnxruntime"
        )
    if precision == INT8_MIXED and device not in ("auto", "cpu"):
        raise ConfigError(
            f"model.precision: {INT8_MIXED} is for the CPU; model.device is {device!r}"
        )
    if (runtime == "onnxruntime" or precision == INT8_MIXED) and compile_:
        raise ConfigError(
            "model.runtime: onnxruntime runs its own graph; model.compile is torch.compile: it "
            "needs torch (or set compile: false)"
        )


def default_weights(name: str) -> Path:
    """Where model ``name``'s weights are when ``model.weights`` is not set."""
    return SHIPPED_WEIGHTS / f"{name}.safetensors"


def with_model(config: Config, name: str) -> Config:
    """``config`` with model ``name`` (``--model``): its weights from the default place, unless
    the config already uses that model (then its own ``model.weights`` stays)."""
    if name == config.model.name:
        return config
    model = replace(config.model, name=name, weights=default_weights(name))
    return replace(config, model=model)


def cache_root() -> Path:
    """The cache folder systemd gives the service (CacheDirectory=), else the user's."""
    systemd_cache = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if systemd_cache:
        return Path(systemd_cache)
    return Path.home() / ".cache" / "hotfolder"


def default_compile_cache() -> Path:
    return cache_root() / "torch-compile"


def default_onnx_cache() -> Path:
    return cache_root() / "onnx"


def _batching(raw: Any) -> BatchingConfig:
    section = _mapping(raw, "batching")
    _known(section, "batching", {"max_batch_size", "max_wait_ms"})
    defaults = BatchingConfig()
    return BatchingConfig(
        max_batch_size=_positive(section, "batching.max_batch_size", defaults.max_batch_size),
        max_wait_ms=_non_negative(section, "batching.max_wait_ms", defaults.max_wait_ms),
    )


def _metrics(raw: Any) -> MetricsConfig:
    section = _mapping(raw, "metrics")
    _known(section, "metrics", {"listen", "thumbnails_mb"})
    listen = _get(section, "metrics.listen", str, MetricsConfig.listen)
    host, _, port = listen.rpartition(":")
    if listen and not (host and port.isdigit() and int(port) < 65536):
        raise ConfigError(
            f"metrics.listen: {listen!r} is not host:port (e.g. 127.0.0.1:9108; '' turns it off)"
        )
    thumbnails = _non_negative(section, "metrics.thumbnails_mb", MetricsConfig.thumbnails_mb)
    return MetricsConfig(listen=listen, thumbnails_mb=thumbnails)


def _daemon(raw: Any) -> DaemonConfig:
    section = _mapping(raw, "daemon")
    allowed = {
        "scan_interval_ms",
        "drain_timeout_ms",
        "workers",
        "max_attempts",
        "stall_timeout_ms",
    }
    _known(section, "daemon", allowed)
    defaults = DaemonConfig()
    return DaemonConfig(
        scan_interval_ms=_positive(section, "daemon.scan_interval_ms", defaults.scan_interval_ms),
        drain_timeout_ms=_positive(section, "daemon.drain_timeout_ms", defaults.drain_timeout_ms),
        workers=_non_negative(section, "daemon.workers", defaults.workers),
        max_attempts=_positive(section, "daemon.max_attempts", defaults.max_attempts),
        stall_timeout_ms=_positive(section, "daemon.stall_timeout_ms", defaults.stall_timeout_ms),
    )


def ensure_folders(config: Config) -> None:
    """Create every configured folder, or say which key names one that cannot be created."""
    folders: list[tuple[str, Path | None]] = [("journal", config.journal.parent)]
    for i, inbox in enumerate(config.inboxes):
        for label in ("path", "outbox", "done", "errors"):
            folders.append((f"inboxes[{i}].{label}", getattr(inbox, label)))
    created_by_us = {inbox.outbox: inbox.permissions for inbox in config.inboxes}
    created_by_us |= {inbox.errors: inbox.permissions for inbox in config.inboxes}
    created_by_us |= {inbox.done: inbox.permissions for inbox in config.inboxes if inbox.done}
    where = f"{config.source}: " if config.source else ""
    for key, folder in folders:
        if folder is None:
            continue
        if folder.exists() and not folder.is_dir():
            raise ConfigError(
                f"{where}{key}: {folder} is a file, not a folder; point {key} at a folder "
                "(or move the file away)"
            )
        try:
            existed = folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            perms = created_by_us.get(folder)
            if perms is not None and not existed:  # the umask does not decide who reads them
                os.chmod(folder, perms.dir_mode)
                if perms.gid is not None:
                    os.chown(folder, -1, perms.gid)
        except OSError as exc:
            raise ConfigError(
                f"{where}{key}: cannot create {folder}: {exc.strerror}; "
                "fix the path or the permissions of its parent"
            ) from None


def _limits(raw: Any) -> LimitsConfig:
    section = _mapping(raw, "limits")
    _known(section, "limits", {"max_pixels", "max_bytes"})
    defaults = LimitsConfig()
    max_pixels = _positive(section, "limits.max_pixels", defaults.max_pixels)
    if max_pixels > 1 << 30:  # OpenCV refuses larger images whatever we allow
        raise ConfigError("limits.max_pixels: at most 1073741824 (1 GP) is supported")
    return LimitsConfig(
        max_pixels=max_pixels,
        max_bytes=_positive(section, "limits.max_bytes", defaults.max_bytes),
    )


def _inbox(raw: Any, key: str, base: Path) -> InboxConfig:
    section = _mapping(raw, key)
    known = {"name", "path", "outbox", "done", "errors", "originals", "recursive"}
    known |= {"settle_ms", "polling", "outputs", "collisions", "file_mode", "dir_mode", "group"}
    _known(section, key, known | {"incomplete_grace_ms"})
    for required in ("name", "path", "outbox", "errors"):
        if required not in section:
            raise ConfigError(f"{key}.{required}: missing; every inbox needs one")
    name = _get(section, f"{key}.name", str, "")
    if not name or set(name) - set(string.ascii_letters + string.digits + "_-"):
        raise ConfigError(f"{key}.name: {name!r} must be letters, digits, '-' or '_'")
    originals = _get(section, f"{key}.originals", str, "move")
    if originals not in ORIGINALS:
        raise ConfigError(f"{key}.originals: {originals!r} is not one of {', '.join(ORIGINALS)}")
    if originals == "move" and "done" not in section:
        raise ConfigError(f"{key}.done: missing; set a done folder or originals: delete")
    try:
        outputs = tuple(
            recipes.parse_output(item, f"{key}.outputs[{i}]")
            for i, item in enumerate(_list(section, "outputs", key))
        )
        recipes.check_unique_names(outputs, f"{key}.outputs")
    except recipes.RecipeError as exc:
        raise ConfigError(str(exc)) from None
    return InboxConfig(
        name=name,
        path=_path(section["path"], f"{key}.path", base),
        outbox=_path(section["outbox"], f"{key}.outbox", base),
        done=_path(section["done"], f"{key}.done", base) if originals == "move" else None,
        errors=_path(section["errors"], f"{key}.errors", base),
        originals=originals,
        recursive=_get(section, f"{key}.recursive", bool, True),
        settle_ms=_non_negative(section, f"{key}.settle_ms", 1000),
        polling=_get(section, f"{key}.polling", bool, False),
        incomplete_grace_ms=_non_negative(
            section, f"{key}.incomplete_grace_ms", InboxConfig.incomplete_grace_ms
        ),
        outputs=outputs or InboxConfig.outputs,
        collisions=_collisions(section, f"{key}.collisions"),
        permissions=_permissions(section, key),
    )


def _collisions(section: Mapping[str, Any], key: str) -> naming.Collision:
    value = _get(section, key, str, naming.Collision.SUFFIX.value)
    try:
        return naming.Collision(value)
    except ValueError:
        choices = ", ".join(c.value for c in naming.Collision)
        raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None


def _permissions(section: Mapping[str, Any], key: str) -> publish.Permissions:
    """Modes as quoted octal strings (YAML reads an unquoted 0644 as 420, and 644 as decimal),
    the group as a name or a number."""
    modes = []
    for name, default in (("file_mode", "0644"), ("dir_mode", "0755")):
        value = section.get(name, default)
        text = value[2:] if isinstance(value, str) and value.startswith("0o") else value
        if not isinstance(text, str) or not text or set(text) - set("01234567") or len(text) > 4:
            raise ConfigError(
                f'{key}.{name}: expected an octal mode in quotes such as "{default}", got {value!r}'
            )
        modes.append(int(text, 8))
    group = section.get("group")
    gid: int | None = None
    if isinstance(group, int) and not isinstance(group, bool) and group >= 0:
        gid = group
    elif isinstance(group, str) and group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"{key}.group: no group named {group!r} on this machine") from None
    elif group is not None:
        raise ConfigError(f"{key}.group: expected a group name or number, got {group!r}")
    return publish.Permissions(file_mode=modes[0], dir_mode=modes[1], gid=gid)


def _check_inboxes(inboxes: tuple[InboxConfig, ...]) -> None:
    names = [inbox.name for inbox in inboxes]
    for inbox in inboxes:
        if names.count(inbox.name) > 1:
            raise ConfigError(f"inboxes: the name {inbox.name!r} is used twice; names are unique")
        for label, folder in (
            ("outbox", inbox.outbox),
            ("done", inbox.done),
            ("errors", inbox.errors),
        ):
            for other in inboxes:  # its own inbox, or another one: taken as new input
                if folder is not None and _within(folder, other.path):
                    raise ConfigError(
                        f"inboxes[{inbox.name}].{label}: {folder} is inside the inbox "
                        f"{other.path}; outputs would be picked up as new input. Put it beside "
                        "the inbox."
                    )
                if folder is not None and _within(other.path, folder):
                    raise ConfigError(
                        f"inboxes[{other.name}].path: {other.path} is inside the {label} folder "
                        f"{folder} of inbox {inbox.name}; its results would be taken as new "
                        "input. Put the inbox beside it."
                    )
    paths = [inbox.path for inbox in inboxes]
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            if a == b or a in b.parents or b in a.parents:
                raise ConfigError(
                    f"inboxes: {a} and {b} overlap; each folder may be watched by one inbox only"
                )


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_journal(journal: Path, inboxes: tuple[InboxConfig, ...]) -> None:
    for inbox in inboxes:
        if _within(journal, inbox.path):
            raise ConfigError(
                f"journal: {journal} is inside the inbox {inbox.path}; the daemon would take "
                "its own journal as a photo. Put it beside the inbox (e.g. /var/lib/hotfolder)."
            )


def _mapping(raw: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: expected a mapping of keys, got {type(raw).__name__}")
    return raw


def _list(section: Mapping[str, Any], key: str, parent: str = "") -> list[Any]:
    value = section.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{_join(parent, key)}: expected a list, got {type(value).__name__}")
    return value


def _known(section: Mapping[str, Any], key: str, allowed: set[str]) -> None:
    for name in section:
        if name not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"{_join(key, str(name))}: unknown key; known keys here: {known}")


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _get(section: Mapping[str, Any], key: str, kind: type[T], default: T) -> T:
    value = section.get(key.rsplit(".", 1)[-1], default)
    # bool is an int in Python; a count given as `true` is a mistake worth reporting.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _positive(section: Mapping[str, Any], key: str, default: int) -> int:
    value = _get(section, key, int, default)
    if value < 1:
        raise ConfigError(f"{key}: must be at least 1, got {value}")
    return value


def _non_negative(section: Mapping[str, Any], key: str, default: int) -> int:
    value = _get(section, key, int, default)
    if value < 0:
        raise ConfigError(f"{key}: must be 0 or more, got {value}")
    return value


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a folder or file path, got {value!r}")
    path = Path(os.path.expanduser(value))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))
