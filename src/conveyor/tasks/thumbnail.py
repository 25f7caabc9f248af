"""`thumbnail` (task type B, CPU-bound): a PNG thumbnail of an inline image, made in a
process pool so the worker's event loop, heartbeats and other tasks keep going."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from conveyor.errors import Fail
from conveyor.registry import TaskContext

MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_PIXELS = 40_000_000  # refuse decompression bombs before decoding
MAX_BOX = 1024
# Standard base64 with its padding, as `b64decode(validate=True)` takes it; in the schema, so
# that the OpenAPI document says what is accepted.
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class ThumbnailPayload(BaseModel):
    """An image (base64, at most 4 MiB decoded) and the box to fit it in."""

    model_config = ConfigDict(extra="forbid")

    image_base64: str = Field(max_length=(MAX_IMAGE_BYTES * 4) // 3 + 4, pattern=BASE64,
                              description="PNG, JPEG, GIF, WebP... base64-encoded")
    width: int = Field(ge=1, le=MAX_BOX, description="box width, pixels")
    height: int = Field(ge=1, le=MAX_BOX, description="box height, pixels")


def make_thumbnail(payload: ThumbnailPayload, ctx: TaskContext) -> dict[str, Any]:
    """Fit the image in the box (keeping its aspect ratio) and return it as PNG."""
    data = base64.b64decode(payload.image_base64)
    try:
        with Image.open(io.BytesIO(data)) as image:
            source = {"width": image.width, "height": image.height, "format": image.format}
            if image.width * image.height > MAX_PIXELS:
                raise Fail(f"image is {image.width}x{image.height}, over {MAX_PIXELS} pixels")
            image.thumbnail((payload.width, payload.height))
            keep = image.mode in ("RGB", "RGBA", "L", "LA", "P")
            small = image if keep else image.convert("RGBA")
            out = io.BytesIO()
            small.save(out, format="PNG", optimize=True)
            width, height = small.width, small.height
    except UnidentifiedImageError as exc:  # its text names the in-memory file object
        raise Fail("not a readable image: no image format Pillow reads") from exc
    except (OSError, Image.DecompressionBombError) as exc:
        raise Fail(f"not a readable image: {exc}") from exc
    png = out.getvalue()
    return {
        "png_base64": base64.b64encode(png).decode(),
        "width": width,
        "height": height,
        "bytes": len(png),
        "source": source,
    }
