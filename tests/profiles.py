"""ICC profiles built for tests: RGB matrix/curve profiles from a space's published primaries,
white point and tone curve (Adobe RGB (1998), ProPhoto, Display P3), and a CMYK profile whose
inks are duller than Pillow's naive CMYK→RGB, as a printer's are. littleCMS reads them as it
reads a camera's; the tests compare against littleCMS's own conversion through them, so what
matters is that they are valid and unlike sRGB, not that they match a vendor's bytes."""

from __future__ import annotations

import struct

import numpy as np

D50 = (0.9642, 1.0, 0.8249)
BRADFORD = np.array(
    [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
)

# name: (red, green, blue primaries as xy; white point xy; gamma, or None for sRGB's curve)
SPACES = {
    "Adobe RGB (1998)": ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06), (0.3127, 0.3290), 563 / 256),
    "ProPhoto RGB": ((0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001), (0.3457, 0.3585), 1.8),
    "Display P3": ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060), (0.3127, 0.3290), None),
}


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(values: np.ndarray) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(float(v)) for v in values)


def _desc(text: str) -> bytes:
    ascii_ = text.encode() + b"\0"
    return (b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_
            + bytes(4 + 4 + 2 + 1 + 67))  # fmt: skip


def _curve(gamma: float | None) -> bytes:
    if gamma is not None:
        return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    x = np.linspace(0, 1, 1024)
    y = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    table = np.round(y * 65535).astype(">u2").tobytes()
    return b"curv\0\0\0\0" + struct.pack(">I", 1024) + table


def _profile(cls: bytes, space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    offset = 128 + 4 + 12 * len(tags)
    table, body = [], b""
    for signature, data in tags:
        table.append(struct.pack(">4sII", signature, offset + len(body), len(data)))
        body += data + bytes(-len(data) % 4)
    size = offset + len(body)
    header = struct.pack(">I4sI4s4s4s", size, b"\0\0\0\0", 0x02100000, cls, space, b"XYZ ")
    header += bytes(12) + b"acsp" + bytes(4 + 4 + 4 + 4 + 8) + struct.pack(">I", 0)
    header += b"".join(_s15(v) for v in D50) + bytes(4 + 16 + 28)
    return header + struct.pack(">I", len(tags)) + b"".join(table) + body


def _to_xyz(xy: tuple[float, float]) -> np.ndarray:
    x, y = xy
    return np.array([x / y, 1.0, (1 - x - y) / y])


def rgb_profile(name: str) -> bytes:
    """A matrix/curve RGB display profile for one of SPACES, adapted to D50 with Bradford as
    ICC v2 requires."""
    red, green, blue, white, gamma = SPACES[name]
    primaries = np.stack([_to_xyz(red), _to_xyz(green), _to_xyz(blue)], axis=1)
    white_xyz = _to_xyz(white)
    to_xyz = primaries * np.linalg.solve(primaries, white_xyz)  # columns: XYZ of R, G, B
    cone = BRADFORD @ white_xyz, BRADFORD @ np.array(D50)
    adapt = np.linalg.inv(BRADFORD) @ np.diag(cone[1] / cone[0]) @ BRADFORD
    columns = adapt @ to_xyz
    curve = _curve(gamma)
    tags = [(b"desc", _desc(name)), (b"cprt", b"text\0\0\0\0none\0"),
            (b"wtpt", _xyz(np.array(D50))), (b"rXYZ", _xyz(columns[:, 0])),
            (b"gXYZ", _xyz(columns[:, 1])), (b"bXYZ", _xyz(columns[:, 2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]  # fmt: skip
    return _profile(b"mntr", b"RGB ", tags)


SRGB_TO_XYZ_D50 = np.array(
    [[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169],
     [0.0139322, 0.0971045, 0.7141733]]
)  # fmt: skip
GRID = 9


def cmyk_profile() -> bytes:
    """A CMYK printer profile (lut16 A2B0 to XYZ): each ink's colour is the naive one pulled a
    fifth of the way to mid-grey, the duller gamut of ink on paper."""
    steps = np.linspace(0, 1, GRID)
    c, m, y, k = np.meshgrid(steps, steps, steps, steps, indexing="ij")
    naive = np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], axis=-1)
    dull = 0.8 * naive + 0.1
    linear = np.where(dull <= 0.04045, dull / 12.92, ((dull + 0.055) / 1.055) ** 2.4)
    xyz = linear.reshape(-1, 3) @ SRGB_TO_XYZ_D50.T
    clut = np.clip(np.round(xyz * 32768), 0, 65535).astype(">u2").tobytes()
    identity = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ramp = np.round(np.linspace(0, 65535, 256)).astype(">u2").tobytes()
    lut = (b"mft2\0\0\0\0" + struct.pack(">BBBB", 4, 3, GRID, 0) + identity
           + struct.pack(">HH", 256, 256) + ramp * 4 + clut + ramp * 3)  # fmt: skip
    tags = [(b"desc", _desc("Test CMYK")), (b"cprt", b"text\0\0\0\0none\0"),
            (b"wtpt", _xyz(np.array(D50))), (b"A2B0", lut)]  # fmt: skip
    return _profile(b"prtr", b"CMYK", tags)
