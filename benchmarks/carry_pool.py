"""The first N pictures of mini-AbC's candidate pool, packed small enough to travel to a lent GPU, and unpacked there.

    python -m benchmarks.carry_pool pack --rows 20000            # here, after `--stage pool`: -> .carry/pool/
    python -m benchmarks.carry_pool unpack                       # there (benchmarks/gpu_check.sh part 5)

The GPU machine cannot reach the npm registry, so it cannot render the pool, and the pool's PNG files (about
1.4 KB each) do not fit beside the repository in what one device call carries (64 MiB in all, docs/performance.md).
`pack` keeps the pictures after mini-AbC's own 1,444 (which travel with the repository) as one uint8 array
[n, H, W, 3] compressed with xz (about 0.9 KB a picture), with the first N captions and the pixels' digest;
`unpack` writes `<bench>/pool/laion_subset/` back in the pool's layout (data/mini_abc_build/pool.py): mini-AbC's
pictures byte for byte, the packed ones as PNG (lossless: the same pixels, so the same encoded arrays), the
captions, and the links to mini-AbC's models, queries and Fisher. It refuses a pack whose pixels do not match its
digest. The unpacked pool holds N rows, so `two_stage_pool.py --sizes all` means N there.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
from pathlib import Path

import numpy as np
from PIL import Image

from data.mini_abc_build.pool import POOL_DIR, link_to_mini_abc
from utils.cli import run
from utils.errors import InputError
from utils.io import atomic_write, save_json

BENCH = Path("data/mini_abc")
CARRY = Path(".carry/pool")


def pack_digest(pictures: np.ndarray) -> str:
    """sha256 (first 16 hex digits) of a uint8 array's bytes: what `unpack` checks the pack against."""
    return hashlib.sha256(np.ascontiguousarray(pictures).tobytes()).hexdigest()[:16]


def pack(bench: Path, rows: int, out: Path) -> dict:
    """Pictures first_rows..rows-1 of bench/pool as out/pictures.npy.xz, captions 0..rows-1 as out/captions.txt, and
    out/pack.json ({rows, first_rows, shape, digest}). Raises InputError (no pool, or more rows than it holds)."""
    images = sorted((bench / POOL_DIR / "laion_subset" / "images").glob("*.png"))
    first = len(list((bench / "abc" / "laion_subset" / "images").glob("*.png")))
    if not images:
        raise InputError(f"{bench / POOL_DIR} holds no pictures: build it first (python -m "
                                f"data.build_mini_abc --out {bench} --stage pool)")
    if not first < rows <= len(images):
        raise InputError(f"--rows {rows}: the pool holds {len(images)} pictures, {first} of them mini-AbC's own; "
                         f"pack between {first + 1} and {len(images)}")
    pictures = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images[first:rows]])
    buf = io.BytesIO()
    np.save(buf, pictures)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "pictures.npy.xz", lambda f: f.write(lzma.compress(buf.getvalue(), preset=9)))
    captions = (bench / POOL_DIR / "laion_subset" / "captions.txt").read_text().splitlines()[:rows]
    atomic_write(out / "captions.txt", lambda f: f.write("\n".join(captions) + "\n"), binary=False)
    record = {"rows": rows, "first_rows": first, "shape": list(pictures.shape), "digest": pack_digest(pictures)}
    save_json(out / "pack.json", record)
    return record


def unpack(bench: Path, src: Path) -> dict:
    """Write bench/pool/laion_subset/{images, captions.txt} from a pack made by `pack`, and the pool's links.
    Raises InputError (no pack, pixels that do not match its digest, or mini-AbC with another number of
    pictures than the pack expects), before anything is written."""
    if not (src / "pack.json").is_file():
        raise InputError(f"{src} holds no pack.json: make one with `python -m benchmarks.carry_pool pack`")
    record = json.loads((src / "pack.json").read_text())
    pictures = np.load(io.BytesIO(lzma.decompress((src / "pictures.npy.xz").read_bytes())))
    if pack_digest(pictures) != record["digest"]:
        raise InputError(f"{src / 'pictures.npy.xz'}: the pixels do not match pack.json's digest; pack it again")
    first = sorted((bench / "abc" / "laion_subset" / "images").glob("*.png"))
    if len(first) != record["first_rows"]:
        raise InputError(f"{bench / 'abc'} holds {len(first)} pictures, the pack was made after "
                         f"{record['first_rows']}: pack it again from this checkout")
    images = bench / POOL_DIR / "laion_subset" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(first):
        atomic_write(images / f"{i:06d}.png", lambda f: f.write(path.read_bytes()))
    for i, picture in enumerate(pictures, start=len(first)):
        atomic_write(images / f"{i:06d}.png", lambda f: Image.fromarray(picture).save(f, format="PNG"))
    atomic_write(images.parent / "captions.txt", lambda f: f.write((src / "captions.txt").read_text()), binary=False)
    link_to_mini_abc(bench / POOL_DIR)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("--bench", default=str(BENCH), help="mini-AbC's folder (its pool is <bench>/pool)")
    p.add_argument("--carry", default=str(CARRY), help="the pack's folder (name it in the device call's carry)")
    p.add_argument("--rows", type=int, default=20000, help="pack: the pool's first N rows")
    args = p.parse_args(argv)
    bench, carry = Path(args.bench), Path(args.carry)
    if args.action == "pack":
        record = pack(bench, args.rows, carry)
        size = (carry / "pictures.npy.xz").stat().st_size / 2**20
        print(f"packed rows {record['first_rows']}..{record['rows'] - 1} of {bench / POOL_DIR}: {size:.1f} MiB -> "
              f"{carry}")
    else:
        record = unpack(bench, carry)
        print(f"unpacked {record['rows']} rows -> {bench / POOL_DIR}")


if __name__ == "__main__":
    run(main)
