"""Draw a plan as a picture: per-device stacked bars (weights, KV cache, workspace, reserve).

Each bar is one budget row of the plan; a black line marks the device's capacity. A capacity far
above everything else (a CPU's RAM) would flatten the GPU bars, so it is written as text at the top
instead. Drawn with Pillow (rectangles, lines and text; matplotlib's DejaVu Sans where installed):
importing matplotlib alone costs ~0.3 s of CPU, more than everything else a cached `glmdeploy plan`
does, while this picture takes ~0.04 s.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from glmdeploy import atomic
from glmdeploy.config.settings import GIB
from glmdeploy.planning.types import BudgetRow, Plan, device_label

PARTS = (
    ("weights_bytes", "weights", "#4C72B0"),
    ("kv_bytes", "KV cache", "#55A868"),
    ("workspace_bytes", "workspace", "#DD8452"),
    ("reserve_bytes", "reserve", "#B0B0B0"),
)
DPI = 110
_FORMATS = {".png": "PNG", "": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
            ".pdf": "PDF"}  # fmt: skip
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 118, 28, 44  # margins (px) around the plot area


def save_plan_picture(plan: Plan, path: Path) -> None:
    """Save the plan's per-device budget as PNG (or JPEG/WebP/PDF, by `path`'s suffix), atomically.

    Raises:
        ValueError: a suffix naming a format Pillow cannot write.
    """
    from PIL import Image, ImageDraw

    path = Path(path)
    image_format = _FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"cannot draw {path.name}: use .png, .jpg, .webp or .pdf")
    rows = plan.rows
    biggest = max([r.total_bytes for r in rows] + [r.capacity_bytes for r in rows if _gpu(r)])
    unit, scale = ("GiB", GIB) if biggest >= GIB else ("MiB", 1024**2)
    stacks = [[float(getattr(r, attr)) / scale for attr, _, _ in PARTS] for r in rows]
    tops = [sum(stack) for stack in stacks]
    gpu_capacities = [r.capacity_bytes / scale for r in rows if _gpu(r)]
    y_max = max([*tops, *gpu_capacities, 1e-3]) * 1.2

    width, height = round(max(4.5, 1.3 * len(rows) + 2.5) * DPI), round(4.5 * DPI)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    box = (_LEFT, _TOP, width - _RIGHT, height - _BOTTOM)
    slot = (box[2] - box[0]) / max(1, len(rows))

    def y_of(value: float) -> float:
        return box[3] - value / y_max * (box[3] - box[1])

    for i, (row, stack, top) in enumerate(zip(rows, stacks, tops, strict=True)):
        centre = box[0] + (i + 0.5) * slot
        bottom = 0.0
        for value, (_, _, colour) in zip(stack, PARTS, strict=True):
            if value > 0:
                left, right = centre - 0.3 * slot, centre + 0.3 * slot
                draw.rectangle((left, y_of(bottom + value), right, y_of(bottom)), fill=colour)
            bottom += value
        capacity = row.capacity_bytes / scale
        if 0 < capacity <= y_max:
            y = y_of(capacity)
            draw.line((centre - 0.4 * slot, y, centre + 0.4 * slot, y), fill="black", width=3)
        elif capacity > y_max:
            text = f"capacity\n{capacity:.3g} {unit} ↑"
            draw.multiline_text((centre, box[1] + 4), text, fill="black", font=_font(11),
                                anchor="ma", align="center")  # fmt: skip
        draw.text((centre, y_of(top) - 3), _percent(row.utilisation), fill="black", font=_font(12),
                  anchor="md")  # fmt: skip
        draw.multiline_text((centre, box[3] + 8), _tick(row), fill="black", font=_font(12),
                            anchor="ma", align="center")  # fmt: skip
    _axes(draw, image, box, y_max, unit)
    _legend(draw, box, any(0 < r.capacity_bytes / scale <= y_max for r in rows))
    draw.multiline_text(((box[0] + box[2]) / 2, box[1] - 6), picture_title(plan), fill="black",
                        font=_font(13), anchor="md", align="center")  # fmt: skip
    with atomic.replacing(path) as tmp:
        image.save(tmp, format=image_format, dpi=(DPI, DPI))


def picture_title(plan: Plan) -> str:
    """Model, dtype and strategy, then the plan's verdict sentence."""
    fp = plan.fingerprint
    return f"{fp.model_class} {fp.dtype}, placement {plan.strategy}\n{plan.verdict.sentence}"


def _axes(draw: Any, image: Any, box: tuple[float, float, float, float], y_max: float,
          unit: str) -> None:  # fmt: skip
    """The frame, y ticks with their labels, and the unit as the (rotated) y label."""
    from PIL import Image, ImageDraw

    draw.rectangle(box, outline="black", width=1)
    for value in _ticks(y_max):
        y = box[3] - value / y_max * (box[3] - box[1])
        draw.line((box[0] - 4, y, box[0], y), fill="black", width=1)
        draw.text((box[0] - 7, y), f"{value:g}", fill="black", font=_font(13), anchor="rm")
    font = _font(13)
    _, _, right, bottom = font.getbbox(unit)
    label = Image.new("RGBA", (round(right) + 2, round(bottom) + 2), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((1, 1), unit, fill="black", font=font)
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (6, round((box[1] + box[3] - rotated.height) / 2)), rotated)


def _legend(draw: Any, box: tuple[float, float, float, float], capacity: bool) -> None:
    entries: list[tuple[str, str | None]] = [("capacity", None)] if capacity else []
    entries += [(name, colour) for _, name, colour in PARTS]
    x, y, line = box[2] + 8, box[1] + 2, 19
    draw.rectangle((x, y, x + _RIGHT - 14, y + 8 + line * len(entries)), outline="#CCCCCC")
    for i, (name, colour) in enumerate(entries):
        middle = y + 4 + line * i + line / 2
        if colour is None:
            draw.line((x + 6, middle, x + 30, middle), fill="black", width=3)
        else:
            draw.rectangle((x + 6, middle - 5, x + 30, middle + 5), fill=colour)
        draw.text((x + 36, middle), name, fill="black", font=_font(12), anchor="lm")


def _ticks(y_max: float) -> list[float]:
    """Round tick values from 0 up to `y_max`: steps of 1, 2, 2.5 or 5 × 10^k, 4 to 8 of them."""
    raw = y_max / 6
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(y_max / step) + 1)]


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    """DejaVu Sans (matplotlib's font, found without importing matplotlib), else Pillow's own."""
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def _tick(row: BudgetRow) -> str:
    """A GPU's label carries its model name on a second line."""
    label = device_label(row.device)
    label = f"rank {row.rank}\n{label}" if row.rank is not None else label
    return f"{label}\n{row.name}" if _gpu(row) else label


def _gpu(row: BudgetRow) -> bool:
    return isinstance(row.device, int)


def _percent(utilisation: float) -> str:
    if math.isinf(utilisation):
        return "∞"
    return "<1%" if 0 < utilisation < 0.005 else f"{utilisation:.0%}"
