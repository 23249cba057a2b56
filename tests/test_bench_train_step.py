"""bench/train_step.py on CPU with the tiny preset: one canvas and NVILA tiling (the GPU bench's plumbing)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import train_step


def test_train_step_smoke_one_canvas_and_tiles(tmp_path: Path) -> None:
    one, tiled = tmp_path / "one.json", tmp_path / "tiles.json"
    train_step.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--json", str(one)])
    train_step.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--json", str(tiled),
                     "--tiles", "--image", "640x480", "--fx", "530"])
    a, b = json.loads(one.read_text()), json.loads(tiled.read_text())
    assert a["canvases_per_image"] == 1 and a["image_mode"] == "letterbox"
    assert b["canvases_per_image"] == 13 and b["image_mode"] == "tiles"  # 4:3 -> 4x3 grid + thumbnail
    assert b["tokens_per_step"] > a["tokens_per_step"] and b["model_tflop_per_step"] > a["model_tflop_per_step"]
    assert all(t > 0 for t in a["step_s_all"] + b["step_s_all"])
