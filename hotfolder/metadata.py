"""What a photo says about itself beyond its pixels: resolution, colour profile, EXIF and XMP.

Read from the input's header, carried with the picture, and written into the outputs: a 300-dpi
print file must come back at 300 dpi, and a shop's copyright and capture date should survive
background removal when asked. Where the photo was taken (GPS) is removed unless asked for:
outputs are published, and a home address in a product photo is a leak. The outputs are upright
pixels, so the orientation they declare is always 1 (as stored).
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

EXIF_ORIENTATION = 0x0112
EXIF_IFD = 0x8769
EXIF_GPS_IFD = 0x8825
EXIF_HEADER = b"Exif\x00\x00"
UPRIGHT = 1
XMP_PNG_KEY = "XML:com.adobe.xmp"
EXIF_NS = "http://ns.adobe.com/exif/1.0/"
TIFF_NS = "http://ns.adobe.com/tiff/1.0/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
# Resolutions outside this range are junk (0, or a field misread); such a file keeps none.
DPI_RANGE = (1.0, 100_000.0)


@dataclass(frozen=True)
class Metadata:
    """``dpi``: (x, y) dots per inch or None; ``icc``: the embedded ICC profile or None;
    ``exif``: EXIF as a TIFF structure prefixed ``Exif\\0\\0`` (upright, GPS removed unless
    kept) or None; ``xmp``: the XMP packet as UTF-8 or None."""

    dpi: tuple[float, float] | None = None
    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None

    def without_gps(self) -> Metadata:
        """The same, with the GPS block of the EXIF and the GPS fields of the XMP removed."""
        exif = None if self.exif is None else _upright_exif(self.exif, keep_gps=False)
        xmp = None if self.xmp is None else _clean_xmp(self.xmp, keep_gps=False)
        return replace(self, exif=exif, xmp=xmp)


def read(image: Image.Image) -> Metadata:
    """The metadata of an opened (header-read) image. Unreadable EXIF or XMP is dropped: not
    worth refusing a photo for."""
    info = image.info
    icc = info.get("icc_profile") or None
    return Metadata(dpi=_dpi(info.get("dpi")), icc=icc, exif=_exif(image), xmp=_xmp(info))


def _dpi(value: object) -> tuple[float, float] | None:
    if not isinstance(value, tuple) or len(value) != 2:
        return None
    try:
        x, y = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    low, high = DPI_RANGE
    return (x, y) if low <= x <= high and low <= y <= high else None


def _exif(image: Image.Image) -> bytes | None:
    try:
        exif = image.getexif()
        if not exif:
            return None
        return _upright_exif(exif.tobytes(), keep_gps=True)
    except Exception:  # damaged EXIF raises anything from struct.error to UnicodeDecodeError
        return None


def _upright_exif(data: bytes, keep_gps: bool) -> bytes:
    exif = Image.Exif()
    exif.load(data)
    for ifd in (EXIF_IFD, EXIF_GPS_IFD):  # Pillow writes back only the blocks it has loaded
        if ifd in exif:
            exif.get_ifd(ifd)
    if not keep_gps:
        exif.pop(EXIF_GPS_IFD, None)
    if EXIF_ORIENTATION in exif:
        exif[EXIF_ORIENTATION] = UPRIGHT
    data = exif.tobytes()
    return data if data.startswith(EXIF_HEADER) else EXIF_HEADER + data


def _xmp(info: Mapping[Any, object]) -> bytes | None:
    value = info.get("xmp") or info.get(XMP_PNG_KEY)
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes) or not value:
        return None
    try:
        return _clean_xmp(value, keep_gps=True)
    except (ET.ParseError, ValueError):
        return None


def _clean_xmp(data: bytes, keep_gps: bool) -> bytes:
    """XMP with the orientation upright, and without the ``exif:GPS…`` fields unless kept. The
    prefixes the packet uses are kept (ElementTree would otherwise rename them ns0, ns1…)."""
    for prefix, uri in _namespaces(data):
        with contextlib.suppress(ValueError):  # a prefix ElementTree keeps for itself (ns0)
            ET.register_namespace(prefix, uri)
    root = ET.fromstring(data.strip(b"\0"))  # the <?xpacket?> wrapper is dropped
    for element in root.iter():
        for name in list(element.attrib):
            if name == f"{{{TIFF_NS}}}Orientation":
                element.attrib[name] = str(UPRIGHT)
            elif not keep_gps and name.startswith(f"{{{EXIF_NS}}}GPS"):
                del element.attrib[name]
        for child in list(element):
            if child.tag == f"{{{TIFF_NS}}}Orientation":
                child.text = str(UPRIGHT)
            elif not keep_gps and str(child.tag).startswith(f"{{{EXIF_NS}}}GPS"):
                element.remove(child)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False))


XMLNS = re.compile(rb'xmlns:([A-Za-z_][\w.-]*)\s*=\s*["\']([^"\']*)["\']')


# XML's own namespace is always written as the "xml" prefix; ElementTree's registry of prefixes
# is shared by every packet after, so one packet may not rebind it (nor claim "xml"/"xmlns").
XML_NS = "http://www.w3.org/XML/1998/namespace"
RESERVED_PREFIXES = {"xml", "xmlns"}


def _namespaces(data: bytes) -> list[tuple[str, str]]:
    found = [(p.decode(), u.decode()) for p, u in XMLNS.findall(data)]
    return [(p, u) for p, u in found if p.lower() not in RESERVED_PREFIXES and u != XML_NS]


def exif_payload(exif: bytes) -> bytes:
    """EXIF without the ``Exif\\0\\0`` prefix: the bare TIFF structure PNG's eXIf chunk holds."""
    return exif[len(EXIF_HEADER) :] if exif.startswith(EXIF_HEADER) else exif
