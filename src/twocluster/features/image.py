"""Images: decode with Pillow, convert to the spec's channels, resize, scale to [0, 1]."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from twocluster.features import UNDECODABLE, FeaturizeError, Featurizer
from twocluster.spec import ImageFeaturizer as ImageSpec

TOO_LARGE = "too_large"


class ImageFeaturizer(Featurizer):
    feature_name = "image"

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        self.shape = self.decoded_shape = (spec.height, spec.width, spec.channels)


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
