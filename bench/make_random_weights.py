"""Write a models folder of full-size Anima files with random weights, in the released layouts, for benchmarks.

    python bench/make_random_weights.py .bench/models
    rdbt gen "1girl" --models-dir .bench/models --size 512x512 --steps 4      # runs end to end (the picture is noise)

writes, in ComfyUI's layout under the folder:
  diffusion_models/anima_random.safetensors       DiT + LLM adapter, `net.` keys, bf16, 3.9 GiB
  text_encoders/qwen_3_06b_random.safetensors     Qwen3-0.6B, `model.` keys, bf16, 1.1 GiB
  vae/qwen_image_vae_random.safetensors           Wan 2.1 VAE, bare keys, bf16, 0.2 GiB
  tokenizers/qwen/tokenizer.json, tokenizers/t5/tokenizer.json
The tokenizers are the embedded tiny model's own (their ids fit every Anima vocabulary), or copies of yours
(--qwen-tokenizer / --t5-tokenizer, e.g. the real ones `rdbt download --only tokenizers` fetches). Files already there
are kept. Any tool that reads the released files (rdbt, ComfyUI, stable-diffusion.cpp) loads them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from rdbt_cli import engine
from rdbt_cli.bench import ANIMA_2B_DIT, ANIMA_ADAPTER, WAN21_VAE, random_module
from rdbt_cli.config import QwenParams

QWEN3_06B = QwenParams(
    vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
    intermediate_size=3072,
)
PARTS = ("dit", "te", "vae", "tokenizers")
FILES = {  # part -> (file under the folder, size in GiB as written)
    "dit": ("diffusion_models/anima_random.safetensors", 3.9),
    "te": ("text_encoders/qwen_3_06b_random.safetensors", 1.1),
    "vae": ("vae/qwen_image_vae_random.safetensors", 0.2),
}


def write(module_factory, path: Path, prefix: str) -> None:
    if path.exists():
        print(f"{path} exists, kept")
        return
    with torch.device("meta"):
        module = module_factory()
    module = random_module(module, "cpu", torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file({prefix + k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
    tmp.replace(path)  # an interrupted run leaves no truncated model behind
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB")


def write_tiny(part: str, path: Path) -> None:
    """The embedded tiny model's network instead (--tiny: the same folder layout in seconds, for tests)."""
    from rdbt_cli import tiny

    if not path.exists():
        {"dit": tiny.write_tiny_dit, "te": tiny.write_tiny_text_encoder, "vae": tiny.write_tiny_vae}[part](path)
    print(path)


def write_tokenizers(root: Path, qwen: str | None, t5: str | None) -> None:
    from rdbt_cli.tiny import build_tiny_tokenizers

    dest = {"qwen": root / "tokenizers" / "qwen" / "tokenizer.json", "t5": root / "tokenizers" / "t5" / "tokenizer.json"}
    if not (qwen and t5) and not all(p.exists() for p in dest.values()):
        tiny = Path(root) / "tokenizers" / ".tiny"
        built = dict(zip(("qwen", "t5"), build_tiny_tokenizers(tiny)))
        qwen, t5 = qwen or built["qwen"], t5 or built["t5"]
    for kind, source in (("qwen", qwen), ("t5", t5)):
        if dest[kind].exists():
            print(f"{dest[kind]} exists, kept")
            continue
        source = Path(source)
        if source.is_dir():
            source = source / "tokenizer.json"
        dest[kind].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest[kind])
        print(dest[kind])
    shutil.rmtree(Path(root) / "tokenizers" / ".tiny", ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("folder", nargs="?", default=".bench/models", help="models folder to write (default .bench/models)")
    ap.add_argument("--only", action="append", choices=PARTS, help="write only this part (repeatable)")
    ap.add_argument("--qwen-tokenizer", metavar="FILE", help="copy this Qwen tokenizer.json instead of the tiny one")
    ap.add_argument("--t5-tokenizer", metavar="FILE", help="copy this T5 tokenizer.json instead of the tiny one")
    ap.add_argument("--tiny", action="store_true", help="the tiny model's networks instead of full-size ones")
    args = ap.parse_args(argv)
    root = Path(args.folder)
    if args.folder.startswith("-"):
        ap.error(f"{args.folder!r} looks like an option, not a folder; write ./{args.folder} if you mean it")
    for given in (args.qwen_tokenizer, args.t5_tokenizer):
        if given and not Path(given).exists():
            ap.error(f"{given}: no such tokenizer file")
    parts = args.only or PARTS
    if not args.tiny:
        need = sum(FILES[p][1] for p in parts if p in FILES and not (root / FILES[p][0]).exists())
        free = shutil.disk_usage(root if root.exists() else root.resolve().parent if root.resolve().parent.exists()
                                 else Path.cwd()).free / 2**30
        if need > free:
            sys.exit(f"{root}: {need:.1f} GiB to write but {free:.1f} GiB free; free some space or pick another folder")
        if need:
            print(f"writing {need:.1f} GiB of random weights into {root} ...", flush=True)
    factories = {
        "dit": (lambda: engine.AnimaDiT(ANIMA_2B_DIT, ANIMA_ADAPTER), "net."),
        "te": (lambda: engine.Qwen3Encoder(QWEN3_06B), "model."),
        "vae": (lambda: engine.WanVAE(WAN21_VAE), ""),
    }
    for part in parts:
        if part == "tokenizers":
            write_tokenizers(root, args.qwen_tokenizer, args.t5_tokenizer)
        elif args.tiny:
            write_tiny(part, root / FILES[part][0])
        else:
            write(factories[part][0], root / FILES[part][0], factories[part][1])


if __name__ == "__main__":
    main()
