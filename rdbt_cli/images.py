"""Input images and masks (img2img, inpainting), read the way ComfyUI's LoadImage and LoadImageMask read them, and
the Lanczos scaling of its ImageScale.

numpy and Pillow only, no torch, so every input is opened, decoded and checked before any weights are read:
- an image is 8-bit RGB, uint8 [H, W, 3] (LoadImage's IMAGE is uint8/255; an alpha channel is dropped);
- a mask is its red channel / 255, float32 [H, W], white = repaint (LoadImageMask, channel "red"; a grey-level file
  reads the same, its red channel being its grey);
- Lanczos is Pillow's 8-bit resampler, which ComfyUI's comfy/utils.py `lanczos` calls on the quantised image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rdbt_cli.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

ASPECT_TOLERANCE = 0.02  # a mask whose shape differs more than this from its image's was made for another picture


def _open_rgb(path, what: str):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    fix = f"give {what} as a PNG, JPEG or WebP file"
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not after the models loaded
            return im.convert("RGB")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file; check the path (batch lines: relative to the prompt "
                          "file)") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a folder; {fix}") from None
    except UnidentifiedImageError:
        raise ConfigError(f"{what} {path}: not an image Pillow can read; {fix}") from None
    except Image.DecompressionBombError:
        raise ConfigError(f"{what} {path}: too many pixels to be an input picture; scale it down first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"{what} {path}: corrupt or truncated image ({e}); save it again or {fix}") from None


def read_image(path) -> np.ndarray:
    """The init image as uint8 [H, W, 3]."""
    import numpy as np  # here, not at import: planning a job without input images (rdbt gen via a server) skips it

    return np.asarray(_open_rgb(path, "init image"))


def read_mask(path) -> np.ndarray:
    """The mask as float32 [H, W] in [0, 1]: red / 255, white = repaint."""
    import numpy as np

    return np.asarray(_open_rgb(path, "mask"))[..., 0].astype(np.float32) / np.float32(255.0)


def lanczos(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] scaled to width x height by Pillow's Lanczos, as ComfyUI's ImageScale (crop disabled)."""
    from PIL import Image

    import numpy as np

    return np.asarray(Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.LANCZOS))


def size_for(width: int, height: int) -> tuple[int, int]:
    """An image's size as a generation size: each side rounded to the nearest multiple of 16 (16 at least)."""
    return tuple(max(16, int(side + 8) // 16 * 16) for side in (width, height))


class Inputs:
    """The checked input files of one job: the init image's size, and notes for the user."""

    def __init__(self, init_image, mask, inpaint: str = "blend"):
        pixels = read_image(init_image)
        self.height, self.width = pixels.shape[:2]
        self.notes: list[str] = []
        if mask is None:
            return
        m = read_mask(mask)
        if not m.any():
            raise ConfigError(f"mask {mask}: all black, so there is nothing to repaint; paint white where the "
                              "picture should change")
        if inpaint == "fill" and not (m >= 0.5).any():
            raise ConfigError(f"mask {mask}: no pixel is half white or more, and --inpaint fill repaints only "
                              "those; paint them white or use --inpaint blend")
        mh, mw = m.shape
        if (mw, mh) != (self.width, self.height):
            if abs(mw / mh / (self.width / self.height) - 1) > ASPECT_TOLERANCE:
                raise ConfigError(f"mask {mask} is {mw}x{mh}, another shape than the init image {init_image} "
                                  f"({self.width}x{self.height}); make the mask from that image")
            self.notes.append(f"mask {Path(mask).name} is {mw}x{mh} and the init image {self.width}x{self.height}: "
                              "the mask is scaled to fit")

    def size(self, width=None, height=None) -> tuple[int, int]:
        """The generation size: the image's own (multiples of 16), or the other side following its shape."""
        if width and not height:
            return width, size_for(width, width * self.height / self.width)[1]
        if height and not width:
            return size_for(height * self.width / self.height, height)[0], height
        return size_for(self.width, self.height)
