"""What the live preview costs per step: latent -> RGB, the terminal picture (each protocol) and the PNG file.

    python bench/preview_cost.py [--size 1024] [--repeat 20]

Prints one JSON line per part with milliseconds per step (median of --repeat). The picture is drawn into a string,
not a terminal, so the time is rdbt's work, not the terminal's. Compare with a step of the model (rdbt bench).
"""

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from rdbt_cli import preview


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (the latent is 1/8 of it)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    side = args.size // 8
    latent = torch.randn(1, 16, 1, side, side, device=args.device)
    rgb = preview.latent_rgb(latent)
    report = {"size": args.size, "latent": f"{side}x{side}", "device": args.device}

    def to_rgb():
        preview.latent_rgb(latent)
        if latent.is_cuda:
            torch.cuda.synchronize()

    report["latent_rgb_ms"] = _median_ms(to_rgb, args.repeat)
    saved = sys.__stdout__
    sys.__stdout__ = io.StringIO()  # kitty pictures are sent through stdout by textual-image
    try:
        for protocol in preview.PROTOCOLS:
            console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=100)
            report[f"{protocol}_ms"] = _median_ms(lambda: console.print(preview.renderable(rgb, protocol)),
                                                  args.repeat)
            drawn = preview.renderable(rgb, protocol)
            console.print(drawn)
            # Rich redraws the live display 4-10 times a second; a picture already drawn is replayed
            report[f"{protocol}_redraw_ms"] = _median_ms(lambda: console.print(drawn), args.repeat)
    finally:
        sys.__stdout__ = saved
    with tempfile.TemporaryDirectory() as tmp:
        report["preview_file_ms"] = _median_ms(lambda: preview.write_png(rgb, Path(tmp) / "p.png"), args.repeat)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
