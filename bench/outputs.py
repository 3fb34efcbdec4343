"""CPU cost per image of foreground colour estimation (decontamination) and of canvases.

    PYTHONPATH=. python bench/outputs.py

On a photo with a soft-edged subject at 1, 4 and 12 MP (the edge band a realistic 1–3 % of the
picture), CPU time of one thread (process time, so other load on the machine does not count),
median of several runs, of: ``foreground.estimate``; ``framing.on_canvas`` to a 1600×1600
square; and the whole shop-square composite (canvas, blend, JPEG) against the plain composite
of the same photo, both without the estimate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
from skimage import data

from hotfolder import foreground, framing, imaging, recipes

SIZES = {"1 MP": (1000, 1000), "4 MP": (2000, 2000), "12 MP": (4000, 3000)}
RUNS = 5


def subject(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    photo = cv2.resize(data.astronaut(), (width, height))
    yy, xx = np.mgrid[:height, :width]
    distance = np.hypot((yy - height / 2) / (height * 0.35), (xx - width / 2) / (width * 0.3))
    edge = max(width, height) / 80  # a soft edge of about 1 % of the picture
    alpha = np.clip((1 - distance) * max(width, height) * 0.3 / edge + 0.5, 0, 1)
    return photo, np.round(alpha * 255).astype(np.uint8)


def cpu_ms(task: Callable[[], object]) -> float:
    times = []
    for _ in range(RUNS):
        started = time.process_time()
        task()
        times.append(time.process_time() - started)
    return statistics.median(times) * 1000


def main() -> None:
    cv2.setNumThreads(1)
    plain = recipes.parse_output({"kind": "composite", "decontaminate": False}, "plain")
    square = recipes.parse_output({"kind": "composite", "decontaminate": False,
                                   "canvas": [1600, 1600], "padding": 0.075}, "square")  # fmt: skip
    for label, (width, height) in SIZES.items():
        print(label, measure(width, height, plain, square))


def measure(width: int, height: int, plain: recipes.Output, square: recipes.Output) -> str:
    photo, alpha = subject(width, height)
    picture = imaging.Picture(rgb=photo, alpha=None)
    band = float(((alpha > 0) & (alpha < 255)).mean())
    estimate = cpu_ms(lambda: foreground.estimate(photo, alpha))
    canvas = cpu_ms(lambda: framing.on_canvas(photo, alpha, (1600, 1600), 0.075, None))
    flat = cpu_ms(lambda: recipes.render(plain, picture, alpha))
    framed = cpu_ms(lambda: recipes.render(square, picture, alpha))
    return (f"(band {band:.1%}): estimate {estimate:.0f} ms; canvas {canvas:.0f} ms; "
            f"composite JPEG {flat:.0f} ms, on the 1600² canvas {framed:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
