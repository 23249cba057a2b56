"""A large Omni3D-format input for driver and executor benches: the sample world's Omni3D file replicated.

`replicate(world_dir, n_images, dest)` writes `dest/BigWorld_train.json` with `n_images` images: the sample
world's Omni3D train images (and their annotations) copied under distinct ids, annotation ids and file
paths (`rNNN/<original path>`), each path a hard link to the original image, so the build reads real files
and every input is distinct. `dest` is the data root of the result.

`--split K FILE`: instead, cut an existing replicated file into K files `BigPart{i}_train.json` in `--dest` (the
images in K contiguous runs, each with its annotations), for the per-file parallel listing; the data root
stays the original file's folder.

`--files K --no-links`: the images written as K files without image files (the 780,000-input `--dry-run`).

Run: `.venv/bin/python -m bench.omni3d_big --world DIR --n 12600 --dest DIR`,
`.venv/bin/python -m bench.omni3d_big --split 4 DIR/BigWorld_train.json --dest DIR4`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def replicate(world_dir: str | Path, n_images: int, dest: str | Path, *, files: int = 1,
              links: bool = True) -> list[Path]:
    """Write the replicated Omni3D file(s) (and hard links); returns their paths. Deterministic in its arguments.

    `files` > 1: the same images cut into that many files of contiguous images, `BigWorld{i}_train.json`, each
    written on its own (a 780,000-image corpus is ~3.8 GB of JSON: never held whole). `links=False`: no image
    files (enough for `--dry-run`, which never opens an image)."""
    world_dir, dest = Path(world_dir), Path(dest)
    src = json.loads((world_dir / "Omni3D" / "SampleWorld_train.json").read_text())
    anns_by_image: dict[int, list[dict]] = {}
    for a in src["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    base = src["images"]
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in range(files):
        images, annotations = [], []
        for k in range(f * n_images // files, (f + 1) * n_images // files):
            r, img = divmod(k, len(base))
            img = base[img]
            rel = f"r{r:03d}/{img['file_path']}"
            link = dest / rel
            if links and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(world_dir / img["file_path"], link)
            iid = r * 1_000_000 + img["id"]
            images.append({**img, "id": iid, "file_path": rel})
            for a in anns_by_image.get(img["id"], []):
                annotations.append({**a, "id": r * 10_000_000 + a["id"], "image_id": iid})
        p = dest / ("BigWorld_train.json" if files == 1 else f"BigWorld{f}_train.json")
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"info": src["info"], "images": images, "categories": src["categories"],
                                   "annotations": annotations}))
        os.replace(tmp, p)
        out.append(p)
    return out


def split(path: str | Path, k: int, dest: str | Path) -> list[Path]:
    """Cut an Omni3D file into `k` files of contiguous images (each with its annotations); returns their paths."""
    src = json.loads(Path(path).read_text())
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    images = src["images"]
    out = []
    for i in range(k):
        part = images[i * len(images) // k:(i + 1) * len(images) // k]
        ids = {img["id"] for img in part}
        p = dest / f"BigPart{i}_train.json"
        p.write_text(json.dumps({"info": src["info"], "images": part, "categories": src["categories"],
                                 "annotations": [a for a in src["annotations"] if a["image_id"] in ids]}))
        out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path)
    ap.add_argument("--n", type=int, default=12600)
    ap.add_argument("--dest", type=Path, required=True)
    ap.add_argument("--split", nargs=2, metavar=("K", "FILE"), help="cut FILE into K files instead")
    ap.add_argument("--files", type=int, default=1, help="write the images as this many files (BigWorld{i}_train.json)")
    ap.add_argument("--no-links", action="store_true", help="no image files (for --dry-run benches)")
    a = ap.parse_args(argv)
    if a.split:
        for p in split(a.split[1], int(a.split[0]), a.dest):
            print(f"{p} ({p.stat().st_size / 1e6:.1f} MB)")
        return 0
    if a.world is None:
        ap.error("--world is required (or --split)")
    for p in replicate(a.world, a.n, a.dest, files=a.files, links=not a.no_links):
        print(f"{p} ({p.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
