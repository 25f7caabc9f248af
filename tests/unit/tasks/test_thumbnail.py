"""`make_thumbnail` on small in-memory images, and the payload's base64 validation."""

from __future__ import annotations

import base64
import io
import uuid
import zlib
from datetime import UTC, datetime

import pytest
from PIL import Image
from pydantic import ValidationError

from conveyor.config import Settings
from conveyor.errors import Fail
from conveyor.registry import TaskContext
from conveyor.tasks.thumbnail import ThumbnailPayload, make_thumbnail


def ctx() -> TaskContext:
    return TaskContext(
        task_id=str(uuid.uuid4()), task_type="thumbnail", attempt=1, max_attempts=3,
        run_at=datetime.now(UTC), worker_id="w",
        settings=Settings(database_url="postgresql://x", redis_url="redis://x"),
    )


def image_b64(width: int, height: int, mode: str = "RGB", fmt: str = "PNG") -> str:
    color: int | tuple[int, ...] = 128 if mode in ("L", "P") else (10, 20, 30, 40)[: len(mode)]
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


def payload(image: str, width: int, height: int) -> ThumbnailPayload:
    return ThumbnailPayload(image_base64=image, width=width, height=height)


def decode_png(result: dict[str, object]) -> Image.Image:
    data = base64.b64decode(str(result["png_base64"]))
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    assert result["bytes"] == len(data)
    return image


@pytest.mark.parametrize(
    ("source", "box", "expected"),
    [
        ((200, 100), (50, 50), (50, 25)),
        ((100, 200), (50, 50), (25, 50)),
        ((300, 300), (64, 32), (32, 32)),
        ((120, 80), (60, 1000), (60, 40)),
    ],
)
def test_fits_the_box_and_keeps_the_aspect_ratio(
    source: tuple[int, int], box: tuple[int, int], expected: tuple[int, int]
) -> None:
    result = make_thumbnail(payload(image_b64(*source), *box), ctx())
    assert (result["width"], result["height"]) == expected
    assert result["width"] <= box[0]
    assert result["height"] <= box[1]
    assert result["source"] == {"width": source[0], "height": source[1], "format": "PNG"}
    with decode_png(result) as image:
        assert image.size == expected


def test_small_images_are_not_enlarged() -> None:
    result = make_thumbnail(payload(image_b64(40, 30), 1024, 1024), ctx())
    assert (result["width"], result["height"]) == (40, 30)


@pytest.mark.parametrize(("mode", "fmt"), [("RGBA", "PNG"), ("L", "PNG"), ("P", "GIF"),
                                           ("CMYK", "JPEG"), ("RGB", "JPEG")])
def test_other_modes_and_formats_become_png(mode: str, fmt: str) -> None:
    result = make_thumbnail(payload(image_b64(64, 32, mode, fmt), 16, 16), ctx())
    assert (result["width"], result["height"]) == (16, 8)
    assert isinstance(result["source"], dict)
    assert result["source"]["format"] == fmt
    with decode_png(result) as image:
        assert image.size == (16, 8)


@pytest.mark.parametrize(
    "data", [b"definitely not an image", b"", b"\x89PNG\r\n\x1a\n" + b"0" * 40]
)
def test_non_image_fails(data: bytes) -> None:
    with pytest.raises(Fail, match="not a readable image"):
        make_thumbnail(payload(base64.b64encode(data).decode(), 10, 10), ctx())


def test_truncated_image_fails() -> None:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(out, format="PNG")
    truncated = out.getvalue()[: len(out.getvalue()) // 2]
    with pytest.raises(Fail, match="not a readable image"):
        make_thumbnail(payload(base64.b64encode(truncated).decode(), 10, 10), ctx())


@pytest.mark.parametrize("bad", ["not base64!", "abc", "aGVsbG8=\n", "a b c d"])
def test_payload_rejects_invalid_base64(bad: str) -> None:
    with pytest.raises(ValidationError, match="should match pattern"):
        ThumbnailPayload(image_base64=bad, width=10, height=10)


def test_payload_accepts_valid_base64() -> None:
    encoded = image_b64(2, 2)
    assert payload(encoded, 1, 1).image_base64 == encoded


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0), (1025, 10), (10, 1025)])
def test_payload_bounds_the_box(width: int, height: int) -> None:
    with pytest.raises(ValidationError):
        ThumbnailPayload(image_base64=image_b64(2, 2), width=width, height=height)


def test_payload_forbids_extra_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ThumbnailPayload.model_validate(
            {"image_base64": image_b64(2, 2), "width": 1, "height": 1, "format": "png"}
        )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width`x`height` but has no pixel data: opening it reads the header
    only, so huge sizes cost nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_too_many_pixels_fails_before_decoding() -> None:
    data = png_header_only(8000, 6000)  # 48 M pixels: over 40 M, under Pillow's own limit
    with pytest.raises(Fail, match="8000x6000, over 40000000 pixels"):
        make_thumbnail(payload(base64.b64encode(data).decode(), 10, 10), ctx())


def test_decompression_bomb_fails() -> None:
    data = png_header_only(20000, 20000)  # 400 M pixels: Pillow refuses to open it
    with pytest.raises(Fail, match="not a readable image"):
        make_thumbnail(payload(base64.b64encode(data).decode(), 10, 10), ctx())
