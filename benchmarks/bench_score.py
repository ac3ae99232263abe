"""`diffusion-align score` on a folder of huge images: peak memory and throughput against a bare lower bound.

Generates `--count` images of `--size` x `--size` pixels (half PNG, half JPEG; smooth colour fields with
grain), then, each in a fresh subprocess so its peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is
its own:

* `score`: the CLI on the folder with a CLIP-type reward (tiny weights, the real 224 input side, so the
  time is the decoding and preprocessing that any CLIP reward pays) and, with `--jpeg`, with
  jpeg_compressibility (which must see every stored pixel);
* `bare`: the lower bound measured in the same run: the reward's forward alone on tensors already in
  memory at the size the loader hands it (no file I/O, no decoding), per image;
* `--compare`: one image scored from its full-size pixels (the old path) against the reduced decode.

    OMP_NUM_THREADS=1 python benchmarks/bench_score.py --count 4 --size 8000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Peak RSS is VmHWM of the child's own address space (ru_maxrss would carry the parent's over fork + exec).
# Imports happen before the clock: the time is the command's work, not Python start-up.
CHILD = r"""
import json, re, sys, time
sys.path.insert(0, {root!r})
import torch, transformers, PIL.Image, diffusion_align.cli, rewards, diffusion_align.commands.score
start = time.perf_counter()
{body}
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_mb": hwm / 1024, **extra}}))
"""

# argv: WARM_FOLDER then the score command; the same command first runs on a one-small-image folder, so
# lazy imports and the reward's loading are not counted as throughput
SCORE = """
from diffusion_align.cli import main
warm, argv = sys.argv[1], sys.argv[2:]
main([warm if a == argv[1] else (a + ".warm" if a.endswith(".jsonl") else a) for a in argv])
start = time.perf_counter()
rc = main(argv)
extra = {"rc": rc}
"""

BARE = """
import numpy as np
from PIL import Image
from rewards.io import load_media
reward = rewards.build("clip", pretrained=sys.argv[1])
pixels = [load_media(p, min_side=int(sys.argv[2]))[None] for p in sys.argv[3:]]  # made before the clock
start = time.perf_counter()
with torch.no_grad():
    for x in pixels:
        reward(x, ["a photo"])
forward = time.perf_counter() - start
start = time.perf_counter()
for p, x in zip(sys.argv[3:], pixels):  # the least decoding work for those pixels: PIL alone, no checks
    with Image.open(p) as img:
        size = tuple(x.shape[-1:-3:-1])
        img.draft("RGB", size)
        np.asarray(img.convert("RGB").resize(size, Image.Resampling.BOX))
decode = time.perf_counter() - start
extra = {"forward_seconds": forward, "decode_seconds": decode, "shapes": [list(x.shape) for x in pixels]}
"""

COMPARE = """
import torch, rewards
from rewards.io import load_media
reward = rewards.build("clip", pretrained=sys.argv[1])
with torch.no_grad():
    full = float(reward(load_media(sys.argv[3])[None], ["a photo"])[0])
    reduced = float(reward(load_media(sys.argv[3], min_side=int(sys.argv[2]))[None], ["a photo"])[0])
extra = {"full": full, "reduced": reduced, "abs_diff": abs(full - reduced)}
"""


def child(body: str, args: list[str]) -> dict:
    code = CHILD.format(root=str(ROOT), body=body)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        # coarse colour field upsampled by PIL (bicubic) plus grain: a photo-like, not-too-compressible image
        coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((size, size), 3)
        grain = Image.effect_noise((size, size), 24).convert("RGB")
        image = Image.blend(coarse, grain, 0.15)
        del coarse, grain
        path = folder / (f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg")
        image.save(path, **({"compress_level": 1} if path.suffix == ".png" else {"quality": 90}))
        paths.append(path)
        del image
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4, help="images (half PNG, half JPEG)")
    parser.add_argument("--size", type=int, default=8000, help="side of each square image")
    parser.add_argument("--jpeg", action="store_true", help="also score with jpeg_compressibility")
    parser.add_argument("--compare", action="store_true", help="score one image at full size too")
    args = parser.parse_args()

    from PIL import Image

    from diffusion_align.commands.score_batches import DECODE_MARGIN
    from rewards.testing import save_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_dir = save_tiny_clip(tmp / "clip", image_size=224)
        t0 = time.perf_counter()
        paths = make_images(tmp / "images", args.count, args.size)
        sizes = [p.stat().st_size / 1e6 for p in paths]
        files = ", ".join(f"{p.name} {s:.0f} MB" for p, s in zip(paths, sizes, strict=True))
        print(
            f"made {args.count} images {args.size}x{args.size} in {time.perf_counter() - t0:.1f}s ({files})"
        )
        min_side = DECODE_MARGIN * 224
        folder = str(tmp / "images")
        reward = ["--reward", "clip", "--reward-arg", f"clip.pretrained={clip_dir}", "--prompt", "a photo"]
        runs = {"score clip": ["score", folder, *reward, "-o", str(tmp / "clip.jsonl")]}
        if args.jpeg:
            jpeg = ["score", folder, "--reward", "jpeg_compressibility", "-o", str(tmp / "jpeg.jsonl")]
            runs["score jpeg_compressibility"] = jpeg
        warm = tmp / "warm"
        warm.mkdir()
        Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(warm / "a.png")
        results = {name: child(SCORE, [str(warm), *argv]) for name, argv in runs.items()}
        bare = child(BARE, [str(clip_dir), str(min_side), *map(str, paths)])
        bound = bare["forward_seconds"] + bare["decode_seconds"]
        print(f"bare: forward on pre-made tensors {bare['shapes']} {bare['forward_seconds']:.3f}s + "
              f"PIL decode to that size {bare['decode_seconds']:.3f}s = {bound:.3f}s")  # fmt: skip
        for name, r in results.items():
            rate = args.count / r["seconds"]
            line = f"{name}: rc {r['rc']}, {r['seconds']:.2f}s ({rate:.2f} images/s), peak RSS "
            line += f"{r['peak_mb']:.0f} MB"
            if name == "score clip":
                line += f"; bare / score time = {bound / r['seconds']:.3f}"
            print(line)
        if args.compare:
            c = child(COMPARE, [str(clip_dir), str(min_side), str(paths[0])])
            print(f"{paths[0].name} full-size score {c['full']:.6f}, reduced {c['reduced']:.6f}, "
                  f"|diff| {c['abs_diff']:.2e} (full-size path peak {c['peak_mb']:.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
