"""CPU cost per image of foreground colour estimation (decontamination) in cutouts/composites.

    PYTHONPATH=. python bench/edges.py

Times ``foreground.estimate`` on a photo with a soft-edged subject at 1, 4 and 12 MP: CPU time
of one thread (process time, so other load on the machine does not count), median of several
runs; the edge band is a realistic 1–3 % of the picture.
"""

from __future__ import annotations

import statistics
import time

import cv2
import numpy as np
from skimage import data

from hotfolder import foreground

SIZES = {"1 MP": (1000, 1000), "4 MP": (2000, 2000), "12 MP": (4000, 3000)}
RUNS = 5


def subject(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    photo = cv2.resize(data.astronaut(), (width, height))
    yy, xx = np.mgrid[:height, :width]
    distance = np.hypot((yy - height / 2) / (height * 0.35), (xx - width / 2) / (width * 0.3))
    edge = max(width, height) / 80  # a soft edge of about 1 % of the picture
    alpha = np.clip((1 - distance) * max(width, height) * 0.3 / edge + 0.5, 0, 1)
    return photo, np.round(alpha * 255).astype(np.uint8)


def main() -> None:
    cv2.setNumThreads(1)
    for label, (width, height) in SIZES.items():
        photo, alpha = subject(width, height)
        times = []
        for _ in range(RUNS):
            started = time.process_time()
            foreground.estimate(photo, alpha)
            times.append(time.process_time() - started)
        band = float(((alpha > 0) & (alpha < 255)).mean())
        print(f"{label}: {statistics.median(times) * 1000:.0f} ms CPU per image "
              f"(band {band:.1%} of pixels)")  # fmt: skip


if __name__ == "__main__":
    main()
