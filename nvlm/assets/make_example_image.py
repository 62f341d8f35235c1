"""Draws ``example.png``, the image ``nvlm run`` uses when no ``--image`` is given.

A 3:2 landscape (720 x 480), so that NVLM's tiling (at most 6 tiles) cuts it into 3 x 2 tiles +
thumbnail; the tiny presets (at most 4) take 2 x 2 + thumbnail. Gradients, flat shapes and a
caption: pleasant to look at, and small as a PNG.
Run once from the repository root (``python nvlm/assets/make_example_image.py``); the PNG is committed.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 480


def draw() -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT))
    canvas = ImageDraw.Draw(image)
    # sky and meadow: smooth vertical gradients, one color per row
    for y in range(HEIGHT):
        t = y / (HEIGHT - 1)
        sky = (int(60 + 150 * t), int(120 + 110 * t), int(225 - 15 * t))
        canvas.line([(0, y), (WIDTH, y)], fill=sky)
    canvas.ellipse([560, 50, 660, 150], fill=(255, 214, 90), outline=(250, 170, 60), width=6)  # sun
    for cx, cy in ((140, 90), (330, 60)):  # clouds
        for dx, dy, r in ((0, 0, 28), (30, -12, 34), (62, 0, 28)):
            canvas.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=(248, 250, 255))
    canvas.polygon([(0, 330), (180, 200), (360, 320), (520, 210), (720, 330), (720, 480), (0, 480)], fill=(80, 150, 90))
    for y in range(360, HEIGHT):  # meadow, lighter towards the viewer
        t = (y - 360) / (HEIGHT - 361)
        canvas.line([(0, y), (WIDTH, y)], fill=(int(100 + 40 * t), int(170 + 30 * t), int(90 + 20 * t)))
    # grass blades and flowers, from a fixed seed so the file is the same on every run
    rng = random.Random(7)
    for _ in range(900):
        x, y = rng.randrange(WIDTH), rng.randrange(365, HEIGHT)
        canvas.line([(x, y), (x + rng.randint(-3, 3), y - rng.randint(4, 10))], fill=(60, 130 + rng.randint(0, 40), 60))
    for _ in range(140):
        x, y, r = rng.randrange(WIDTH), rng.randrange(370, HEIGHT), rng.randint(2, 4)
        petals = rng.choice([(250, 250, 250), (250, 200, 60), (230, 110, 150), (170, 130, 230)])
        canvas.ellipse([x - r, y - r, x + r, y + r], fill=petals)
        canvas.point((x, y), fill=(250, 180, 40))
    # a house: walls, roof, door, window
    canvas.rectangle([420, 300, 560, 400], fill=(236, 222, 196), outline=(90, 70, 60), width=3)
    canvas.polygon([(405, 302), (490, 240), (575, 302)], fill=(190, 70, 60), outline=(90, 40, 30))
    canvas.rectangle([470, 340, 505, 400], fill=(120, 80, 50))
    canvas.rectangle([517, 320, 547, 350], fill=(160, 210, 240), outline=(90, 70, 60), width=2)
    # a tree
    canvas.rectangle([226, 330, 244, 400], fill=(110, 75, 45))
    canvas.ellipse([190, 255, 280, 345], fill=(50, 120, 60))
    # a caption on a plate
    canvas.rounded_rectangle([40, 405, 330, 460], radius=12, fill=(255, 255, 255), outline=(40, 60, 90), width=3)
    try:
        font = ImageFont.load_default(size=28)  # Pillow >= 10.1 scales its bundled font
    except TypeError:
        font = ImageFont.load_default()
    canvas.text((58, 416), "NVLM example", fill=(40, 60, 90), font=font)
    return image


if __name__ == "__main__":
    path = Path(__file__).with_name("example.png")
    draw().save(path, optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.1f} KiB")
