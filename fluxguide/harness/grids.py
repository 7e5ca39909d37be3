"""Sample grids: images with their prompts, written as one PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from fluxguide.serialization import open_for_writing


def prompt_grid(
    columns: dict[str, torch.Tensor], prompts: list[str], cell: int = 128, caption_width: int = 220
) -> Image.Image:
    """A grid with one row per prompt and one column per sampler.

    Args:
        columns: column title -> images ``(N, 3, H, W)`` in [0, 1], one per prompt.
        prompts: the ``N`` prompts, written at the left of each row.
        cell: size in pixels of each image (upscaled with nearest-neighbour, so pixels stay visible).
        caption_width: width in pixels of the prompt column.
    """
    n = len(prompts)
    for title, images in columns.items():
        if images.shape[0] != n:
            raise ValueError(f"column {title!r} has {images.shape[0]} images for {n} prompts")
    font = ImageFont.load_default()
    header, gap = 18, 4
    pitch = cell + gap  # white gutters keep neighbouring images apart
    canvas = Image.new("RGB", (caption_width + pitch * len(columns), header + pitch * n), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (title, images) in enumerate(columns.items()):
        draw.text((caption_width + j * pitch + 4, 2), title, fill="black", font=font)
        for i in range(n):
            array = (images[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
            tile = Image.fromarray(array.astype("uint8")).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (caption_width + j * pitch, header + i * pitch))
    for i, prompt in enumerate(prompts):
        lines = textwrap.wrap(prompt, width=caption_width // 7)
        draw.multiline_text((4, header + i * pitch + cell // 2 - 6 * len(lines)), "\n".join(lines), fill="black", font=font)
    return canvas


def save_prompt_grid(columns: dict[str, torch.Tensor], prompts: list[str], path: str | Path, *,
                     root: str | Path | None = None, **kwargs) -> Path:
    """Write :func:`prompt_grid` to ``path`` (PNG) and return the path.

    ``root``: the run folder ``path`` lies in, if any: a link planted below it (a ``samples`` folder, the PNG
    itself) is refused (:class:`~fluxguide.serialization.LinkRefusedError`); so is a link at ``path`` always.
    """
    path = Path(path)
    grid = prompt_grid(columns, prompts, **kwargs)
    with open_for_writing(path, "wb", root=root) as f:
        grid.save(f, format="PNG")
    return path
