"""The real CLIP BPE tokenizer for the mini-AbC base model, made from the vocabulary in open_clip_torch.

SD v1.4's tokenizer is CLIP's: byte-level BPE with 49,152 - 256 - 2 merges, words ending in '</w>',
and <|startoftext|> / <|endoftext|>. PyPI's open_clip_torch wheel carries the merge list
(`open_clip/bpe_simple_vocab_16e6.txt.gz`); this module fetches the wheel alone (no dependencies,
nothing imported from it), rebuilds CLIP's vocab.json / merges.txt and returns a transformers
CLIPTokenizer, so prompts tokenize exactly as they would for Stable Diffusion.
"""
import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

OPEN_CLIP = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


def fetch_bpe_file(cache_dir) -> Path:
    """The gzipped merge list, extracted from the open_clip_torch wheel (downloaded once into cache_dir)."""
    cache_dir = Path(cache_dir)
    target = cache_dir / "bpe_simple_vocab_16e6.txt.gz"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("open_clip_torch-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
               str(cache_dir), OPEN_CLIP]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob("open_clip_torch-*.whl"))
        if proc.returncode or not wheels:
            raise RuntimeError(f"could not download {OPEN_CLIP} (needed for CLIP's BPE vocabulary): "
                               f"`{' '.join(cmd)}` said: {proc.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[-1]) as z:
        target.write_bytes(z.read(BPE_MEMBER))
    return target


def bytes_to_unicode() -> dict:
    """CLIP's (and GPT-2's) reversible map of the 256 byte values onto printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_vocab(bpe_gz, out_dir) -> Path:
    """vocab.json and merges.txt in the layout of openai/clip-vit-large-patch14 (49,408 entries)."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1] if line.strip()]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    return out_dir


def build_clip_tokenizer(cache_dir, out_dir):
    from transformers import CLIPTokenizer

    folder = write_clip_vocab(fetch_bpe_file(cache_dir), out_dir)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")
