"""Peak memory of loss tracking against the LAION subset size and the batch size, on synthetic arrays.

    python -m benchmarks.memory_scaling       # subsets of 1,000 and 8,000 images, B = 100 and 400

Writes memory-mapped `laion_latents.npy` [2N, 4, 64, 64] and `laion_text_embeddings.npy` [N, 77, 768] of
SD v1.4's real shapes (random values) into a temporary folder, then in a fresh process per case runs
`collect_losses` over all 2N rows, as stage 1 and stage 2 do, sampling /proc/self/status every 20 ms. The
model is a stand-in with SD's UNet signature (a convolution of the noisy latent plus a projection of the
text embedding): what is measured is the data path, whose memory is the question; a real UNet adds its
weights and activations, which depend on B alone. Prints the peak anonymous
memory (the process's own footprint: model, batches, outputs) and the peak file-backed resident memory
(pages of the memory-mapped arrays; page cache that the kernel drops under pressure), under each heap policy
of utils.host_memory.configure_heap: glibc's allocator never trimmed, every buffer on the heap and trimmed every
16 batches (what both stages do), glibc's thresholds trimmed alike, a fixed mmap threshold. Linux only.

    python -m benchmarks.memory_scaling --sizes 1000,8000,32000,64000 --batch_sizes 100 --allocators trim,heap+trim
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from benchmarks.runner import write_random_candidates
from utils.host_memory import HEAP_POLICIES


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class StandInUNet:
    """unet(noisy, t, text, return_dict=False)[0] of the right shape, at almost no compute."""

    def __init__(self, torch):
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.text = torch.nn.Linear(768, 4)

    def __call__(self, noisy, timesteps, text, return_dict=False):
        return (self.conv(noisy) + self.text(text.mean(1))[:, :, None, None],)


LABELS = {"trim": "glibc, trimmed every 16 batches", "glibc": "glibc default, never trimmed",
          "heap+trim": "all on the heap, trimmed (the scripts)"}


def measure(dataroot: str, n: int, batch_size: int, allocator: str) -> dict:
    """Runs in the child process: one pass of collect_losses over the 2n rows, sampling memory, under the heap
    policy `allocator` (utils.host_memory.configure_heap)."""
    import torch
    from diffusers import DDPMScheduler

    from utils.data import LaionCandidates
    from utils.losses import collect_losses
    from utils.host_memory import configure_heap

    configure_heap(allocator)

    torch.manual_seed(0)
    unet = StandInUNet(torch)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    peak = {"RssAnon": 0, "RssFile": 0}
    anon = []  # every sample: the second half's mean says whether memory still grows late in a long pass
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k in peak:
                peak[k] = max(peak[k], status_kb(k))
            anon.append(status_kb("RssAnon"))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.time()
    losses = collect_losses(unet, scheduler, LaionCandidates(dataroot, n), batch_size=batch_size, time_samples=1)
    done.set()
    thread.join()
    return {"n_images": n, "rows": len(losses), "batch_size": batch_size, "seconds": round(time.time() - t0, 1),
            "allocator": LABELS.get(allocator, f"mmap threshold {allocator}"),
            "peak_anon_MiB": round(peak["RssAnon"] / 1024), "peak_file_MiB": round(peak["RssFile"] / 1024),
            "late_mean_anon_MiB": round(sum(anon[len(anon) // 2:]) / max(len(anon) - len(anon) // 2, 1) / 1024)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,8000", help="LAION subset sizes (images)")
    p.add_argument("--batch_sizes", default="100,400")
    p.add_argument("--allocators", default="glibc,heap+trim,trim,1MiB", help="subset of: " + ", ".join(HEAP_POLICIES))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'allocator':<46} {'images':>7} {'rows':>7} {'B':>5} {'seconds':>8} {'peak anon MiB':>14} "
          f"{'late mean anon MiB':>19} {'peak file MiB':>14} {'arrays MiB':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = Path(tmp) / str(n)
            root.mkdir()
            write_random_candidates(root, n, 64, 768, np.random.default_rng(0), chunk=500)  # SD v1.4's shapes
            arrays = sum(f.stat().st_size for f in root.iterdir()) / 2**20
            for allocator in args.allocators.split(","):
                for b in (int(x) for x in args.batch_sizes.split(",")):
                    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_scaling", "--child", str(root), str(n), str(b), allocator],
                                         cwd=REPO,
                                         capture_output=True, text=True, check=True,
                                         env={**os.environ, "TQDM_DISABLE": "1"})
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"{r['allocator']:<46} {r['n_images']:>7} {r['rows']:>7} {r['batch_size']:>5} "
                          f"{r['seconds']:>8} {r['peak_anon_MiB']:>14} {r['late_mean_anon_MiB']:>19} "
                          f"{r['peak_file_MiB']:>14} {arrays:>11.0f}",
                          flush=True)
            for f in root.iterdir():
                f.unlink()


if __name__ == "__main__":
    main()
