"""Images: decode with Pillow, convert to the spec's channels, resize, scale to [0, 1]."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from twocluster.features import TOO_LARGE, UNDECODABLE, WRONG_FORMAT, FeaturizeError, Featurizer, extension_of
from twocluster.spec import ImageContentChecks, ImageInputs
from twocluster.spec import ImageFeaturizer as ImageSpec

BLANK = "blank"
SATURATED = "saturated"
TOP_OF_RANGE = 254.0 / 255.0  # a pixel at or above it is saturated

_FORMATS_BY_EXTENSION = {"png": {"PNG"}, "jpg": {"JPEG"}, "jpeg": {"JPEG"}, "gif": {"GIF"}, "bmp": {"BMP"},
                         "tif": {"TIFF"}, "tiff": {"TIFF"}, "webp": {"WEBP"}}


class ImageFeaturizer(Featurizer):
    feature_name = "image"

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        self.shape = self.decoded_shape = (spec.height, spec.width, spec.channels)


    def check_header(self, data: bytes, name: str, inputs: ImageInputs) -> None:
        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                fmt, width, height = img.format, img.width, img.height
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise FeaturizeError(UNDECODABLE, f"not a readable image ({e})") from None
        promised = _FORMATS_BY_EXTENSION.get(extension_of(name))
        if fmt not in inputs.formats:
            raise FeaturizeError(WRONG_FORMAT, f"a {fmt} image; the spec allows {', '.join(inputs.formats)}")
        if promised is not None and fmt not in promised:
            raise FeaturizeError(WRONG_FORMAT, f"a {fmt} image named .{extension_of(name)}")
        if width * height > self.spec.max_source_pixels:
            raise FeaturizeError(TOO_LARGE, f"{width}x{height} exceeds {self.spec.max_source_pixels} pixels")

    def read(self, data: bytes, name: str = "", inputs: ImageInputs | None = None, content: bool = False,
             may_be_quiet: bool = False, warnings: list[str] | None = None, measures: list | None = None) -> np.ndarray:
        """As the base class's, and with ``content``, the pixels checked against ``inputs.content``."""
        pixels = super().read(data, name, inputs)
        if content and inputs is not None:
            try:
                check_content(pixels, inputs.content)
            except FeaturizeError as problem:
                self.content_problem(problem, inputs.content, warnings)
        return pixels

    def decode(self, data: bytes) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as img:
                # Check the size from the header before decoding pixels (decompression bombs).
                if img.width * img.height > self.spec.max_source_pixels:
                    raise FeaturizeError(TOO_LARGE, f"{img.width}x{img.height} exceeds {self.spec.max_source_pixels} pixels")
                img = img.convert("L" if self.spec.channels == 1 else "RGB")
                img = img.resize((self.spec.width, self.spec.height), Image.Resampling.BILINEAR, reducing_gap=2.0)
                pixels = np.asarray(img, dtype=np.float32) / 255.0
        except FeaturizeError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise FeaturizeError(UNDECODABLE, f"not a readable image ({e})") from None
        return pixels.reshape(self.shape)


def check_content(pixels: np.ndarray, checks: ImageContentChecks) -> None:
    """Raise :class:`FeaturizeError` (``saturated``, then ``blank``) for featurized pixels (in
    [0, 1]) that fail one of ``checks``: an over-exposed image is uniform too, and is called what
    it is."""
    if checks.max_saturated_share is not None:
        saturated = float(np.count_nonzero(pixels >= TOP_OF_RANGE)) / pixels.size
        if saturated > checks.max_saturated_share:
            raise FeaturizeError(SATURATED, f"{saturated:.0%} of the pixels at the top of the range; the spec allows "
                                            f"{checks.max_saturated_share:.0%}")
    if checks.min_contrast is not None:
        contrast = float(pixels.std(dtype=np.float64))
        if contrast < checks.min_contrast:
            raise FeaturizeError(BLANK, f"a uniform image (pixel standard deviation {contrast:.4f}; the spec needs "
                                        f"{checks.min_contrast})")
