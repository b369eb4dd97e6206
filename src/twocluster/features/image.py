"""Images: decode with Pillow, convert to the spec's channels, resize, scale to [0, 1]."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from twocluster.features import TOO_LARGE, UNDECODABLE, WRONG_FORMAT, FeaturizeError, Featurizer, extension_of
from twocluster.spec import ImageFeaturizer as ImageSpec
from twocluster.spec import ImageInputs

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
