"""Finding and identifying model files without loading tensors (no torch import here).

Models folders (ComfyUI / A1111 layouts, `extra_model_paths.yaml`), header sniffing, the table of file formats that
classification (spec/formats.md §1.7) and the engine's loaders share, name resolution, file hashes with a cache
(formats.md §4.1-§4.2), official downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterable, Mapping, Sequence

from rdbt_cli.config import data_dir, user_dir
from rdbt_cli.errors import CheckpointError, ConfigError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# Keys that some Cosmos-derived files carry but that are recomputed, never parameters (anima.md §1.1).
IGNORED_KEY_PARTS = ("pos_embedder.", "_extra_state", "accum_")


_GGUF_HERE = "a GGUF file, which rdbt reads only as the diffusion model (--model); use a .safetensors file here"


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return (tensor entries, __metadata__) of a safetensors file, checking it is whole.

    Reads only the 8-byte length and the JSON header; the tensor data is checked by size, not read.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: file not found; check the path or run `rdbt models` to see what rdbt finds")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a .safetensors file")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{p}: pickle checkpoints ({p.suffix}) can run arbitrary code and are never loaded; "
            "convert it to .safetensors or download the .safetensors release"
        )
    if p.suffix.lower() == ".gguf":
        raise CheckpointError(f"{p}: {_GGUF_HERE}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if head[:4] == b"GGUF":
            raise CheckpointError(f"{p}: {_GGUF_HERE}")
        if len(head) < 8:
            raise CheckpointError(f"{p}: file is empty or truncated ({size} bytes); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 200_000_000):
            raise CheckpointError(
                f"{p}: not a safetensors file (bad header length); if it is a pickle checkpoint, convert it to .safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise CheckpointError(f"{p}: not a safetensors file (unreadable header); download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors file (header is not a table)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{p}: damaged safetensors header (__metadata__ is not a table of strings); "
                              "download it again")
    end = _check_entries(p, header)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{p}: file is truncated ({size:,} bytes, header says {8 + n + end:,}); the download did not finish, fetch it again"
        )
    return header, meta


# safetensors dtypes and their sizes in bits (safetensors' Dtype enum).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
              "F64": 64, "I64": 64, "U64": 64}


def _check_entries(p: Path, header: dict) -> int:
    """Every tensor entry well-formed (a known dtype, a shape of whole numbers, offsets that hold exactly that many
    bytes and overlap no other tensor), as the safetensors library will demand when loading; returns the data end."""
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (dtype in DTYPE_BITS and isinstance(shape, list)
                  and all(type(d) is int and d >= 0 for d in (*shape, begin, end)) and begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{p}: damaged safetensors header at tensor {name!r} (dtype, shape or offsets); "
                                  "download it again")
        if end - begin != -(-_numel(shape) * DTYPE_BITS[dtype] // 8):
            raise CheckpointError(f"{p}: damaged safetensors header: tensor {name!r} of shape {shape} {dtype} "
                                  f"does not fit its {end - begin:,} bytes; download it again")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{p}: damaged safetensors header: tensors {a!r} and {b!r} overlap; "
                                  "download it again")
    return spans[-1][1] if spans else 0


def strip_prefix(keys, prefixes) -> str:
    """The prefix among `prefixes` that most keys start with (more than 5, as ComfyUI requires), or ''."""
    counts = {pre: sum(1 for k in keys if k.startswith(pre)) for pre in prefixes if pre}  # '' is the fallback
    best = max(counts, key=counts.get, default="")
    return best if counts.get(best, 0) > 5 else ""


def is_ignored_key(key: str) -> bool:
    return any(part in key for part in IGNORED_KEY_PARTS)


# ---------------------------------------------------------------------------------------------------------------------
# file formats and classification (spec/formats.md §1.3, §1.7)
# ---------------------------------------------------------------------------------------------------------------------

MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf") + PICKLE_SUFFIXES + (".pt2",)
# The prefixes a file's keys are voted between when no row below claims it (LoRAs, unknown files).
PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.", "first_stage_model.", "cond_stage_model.", "text_encoders.")

DIT_KEY = "blocks.0.mlp.layer1.weight"
ADAPTER_KEY = "llm_adapter.blocks.0.cross_attn.q_proj.weight"
WAN22_VAE_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"
# Key segments that only adapters carry (formats.md §2.1); `lora.up` / `lora.down` are matched as a pair below.
ADAPTER_SEGMENTS = frozenset(
    "lora_up lora_down lora_mid lora_A lora_B lora_linear_layer hada_w1_a hada_w1_b hada_w2_a hada_w2_b hada_t1 hada_t2 "
    "lokr_w1 lokr_w2 lokr_w1_a lokr_w1_b lokr_w2_a lokr_w2_b lokr_t2 oft_blocks oft_diag lora_magnitude_vector".split()
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _key_is_adapter(key: str) -> bool:
    parts = key.split(".")
    if any(p in ADAPTER_SEGMENTS or p.endswith("_lora") for p in parts) or parts[-1] in ("diff", "diff_b", "dora_scale"):
        return True
    return any(a == "lora" and b in ("up", "down") for a, b in zip(parts, parts[1:]))


@dataclass(frozen=True)
class FileFormat:
    """One kind of file users have, told by its tensor names.

    `classify` and the engine's loaders read the same rows, so what `rdbt models` calls a file and why a loader
    refuses it ("not a VAE but a text encoder; pass it with --text-encoder") cannot drift apart.
    """

    kind: str  # what classify() reports
    label: str  # how messages name it
    fix: str  # what to do with such a file when it was given where another kind was asked for
    prefixes: tuple[str, ...] = ("",)  # where its keys sit, first match wins; '' is bare keys
    markers: tuple[str, ...] = ()  # keys (after the prefix) that together identify it
    absent: tuple[str, ...] = ()  # keys (after the prefix) whose presence makes it another row
    hints: tuple[str, ...] = ()  # key fragments that still betray it in a partial or oddly prefixed file
    instead: str = ""  # what to give when this kind was asked for and the file is none

    def prefix_in(self, keys: Collection[str]) -> str | None:
        """The first of `prefixes` under which `keys` hold every marker and no `absent` key, or None."""
        if not self.markers:
            return None
        return next((pre for pre in self.prefixes if all(pre + m in keys for m in self.markers)
                     and not any(pre + a in keys for a in self.absent)), None)

    def locate(self, keys: Iterable[str], path: str | os.PathLike) -> str:
        """The prefix of this kind's keys in the file at `path`; a CheckpointError saying what the file is otherwise."""
        keys = set(keys)
        prefix = self.prefix_in(keys)
        if prefix is not None:
            return prefix
        other = looks_like(keys)
        if other is None or other is self:
            raise CheckpointError(f"{path}: not {self.label} (no {self.prefixes[0]}{self.markers[0]}); {self.instead}")
        raise CheckpointError(f"{path}: not {self.label} but {other.label}; {other.fix}")


DIT_FILE = FileFormat(
    "dit", "an Anima diffusion model", "pass it with --model",
    prefixes=("net.", "model.diffusion_model.", "diffusion_model.", ""),
    markers=(DIT_KEY, ADAPTER_KEY),
    hints=("x_embedder.proj.1.", "blocks.0.mlp.layer1."),
    instead="use an Anima model file",
)
TE_FILE = FileFormat(
    "te", "a Qwen3 text encoder", "pass it with --text-encoder",
    # the release, ComfyUI's clip state dict, an all-in-one checkpoint, the `text_encoders.` name space, bare keys
    prefixes=("model.", "qwen3_06b.transformer.model.", "cond_stage_model.qwen3_06b.transformer.model.",
              "text_encoders.qwen3_06b.transformer.model.", ""),
    markers=("layers.0.self_attn.q_norm.weight",),  # ComfyUI's detection key (comfy/sd.py detect_te_model)
    hints=("embed_tokens.", "layers.0.self_attn.", "layers.0.mlp.gate_proj"),
    instead="pass the qwen_3_06b_base.safetensors text encoder",
)
VAE_FILE = FileFormat(
    "vae", "a Wan 2.1 / Qwen-Image VAE", "pass it with --vae",
    prefixes=("", "first_stage_model."),
    markers=("decoder.middle.0.residual.0.gamma",),
    absent=(WAN22_VAE_KEY,),
    hints=("decoder.middle.", "encoder.downsamples.", "decoder.upsamples."),
    instead="use qwen_image_vae.safetensors",
)
LORA_FILE = FileFormat("lora", "a LoRA", "pass it with --lora")  # told by ADAPTER_SEGMENTS, not by markers
COMPONENT_FILES = (DIT_FILE, TE_FILE, VAE_FILE)  # what an all-in-one checkpoint bundles

# Every row with markers or hints, in the order they are tried; the look-alikes are files users confuse with Anima's.
FORMATS = (
    DIT_FILE,
    FileFormat("cosmos_dit", "a Cosmos-Predict2 DiT without Anima's LLM adapter", DIT_FILE.instead,
               DIT_FILE.prefixes, (DIT_KEY,), absent=(ADAPTER_KEY,)),
    FileFormat("diffusers_dit", "a diffusers-format transformer", "use the ComfyUI split file (net.* keys)",
               DIT_FILE.prefixes, ("transformer_blocks.0.attn1.to_q.weight", "patch_embed.proj.weight"),
               hints=("transformer_blocks.0.attn1.to_q",)),
    TE_FILE,
    FileFormat("unknown", "a Wan 2.2 VAE (z 48)", VAE_FILE.instead, VAE_FILE.prefixes, (WAN22_VAE_KEY,)),
    VAE_FILE,
    FileFormat("unknown", "a diffusers-format Qwen-Image VAE", VAE_FILE.instead, VAE_FILE.prefixes,
               ("decoder.mid_block.resnets.0.norm1.gamma",)),
    FileFormat("unknown", "an SD/SDXL/Flux-style VAE", VAE_FILE.instead,
               hints=("decoder.mid.", "decoder.up.", "decoder.mid_block.")),
    FileFormat("unknown", "an SD/SDXL/Flux/SD3 model", "rdbt runs Anima only",
               hints=("input_blocks.", "double_blocks.", "joint_blocks.")),
)


def identify(keys: Collection[str]) -> tuple[FileFormat, str] | None:
    """The first row of FORMATS whose markers `keys` hold, with the prefix they sit under."""
    return next(((f, pre) for f in FORMATS if (pre := f.prefix_in(keys)) is not None), None)


def looks_like(keys: Collection[str]) -> FileFormat | None:
    """What a file most likely is, for messages: by its markers, else a LoRA by any adapter key, else by a hint."""
    found = identify(keys)
    if found:
        return found[0]
    if any(map(_key_is_adapter, keys)):
        return LORA_FILE
    return next((f for f in FORMATS if any(h in k for h in f.hints for k in keys)), None)


@dataclass(frozen=True)
class FileInfo:
    """One model file as sniffed from its header; `details` holds what the header tells (prefix, width, quant...)."""

    path: Path
    kind: str
    details: dict = field(default_factory=dict)
    size: int = 0
    hash: str | None = None  # AutoV2, only when already in the hash cache

    @property
    def error(self) -> str | None:
        return self.details.get("error")

    @property
    def supported(self) -> bool:
        return self.kind in ("dit", "te", "vae", "lora", "aio")


def vote_prefix(keys: Iterable[str]) -> str:
    """The one of PREFIXES most keys start with ('' when keys without any of them are the majority)."""
    counts = dict.fromkeys(PREFIXES, 0)
    bare = 0
    for k in keys:
        for pre in PREFIXES:
            if k.startswith(pre):
                counts[pre] += 1
                break
        else:
            bare += 1
    best = max(PREFIXES, key=lambda p: counts[p])
    return best if counts[best] > bare else ""


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _dtype_summary(header: dict) -> str:
    by_elems: dict[str, int] = {}
    for entry in header.values():
        by_elems[entry["dtype"]] = by_elems.get(entry["dtype"], 0) + _numel(entry["shape"])
    return "+".join(sorted(by_elems, key=lambda d: -by_elems[d]))


def _quant(header: dict, meta: dict) -> str | None:
    """How a checkpoint is quantised (formats.md §1.5): 'scaled_fp8', 'comfy_quant:<formats>', 'fp8' or None."""
    names = header.keys()
    if any(k == "scaled_fp8" or k.endswith(".scaled_fp8") or k.endswith(".scale_weight") for k in names):
        return "scaled_fp8"
    formats: set[str] = set()
    qmeta = meta.get("_quantization_metadata")
    if qmeta:
        try:
            layers = json.loads(qmeta).get("layers", {})
            formats = {str(v.get("format")) for v in layers.values() if isinstance(v, dict)}
        except (ValueError, AttributeError):
            formats = {"?"}
    if formats or any(k.endswith((".comfy_quant", ".weight_scale")) for k in names):
        return "comfy_quant:" + (",".join(sorted(formats)) or "per-layer")
    if any(e["dtype"].startswith("F8") for e in header.values()):
        return "fp8"
    return None


def _blocks(keys: Iterable[str]) -> int:
    return len({m.group(1) for k in keys if (m := _BLOCK_RE.match(k))})


def _dit_details(sub: dict[str, dict]) -> dict:
    d: dict = {"blocks": _blocks(sub)}
    x = sub.get("x_embedder.proj.1.weight")
    if x and len(x["shape"]) == 2:
        d["width"] = int(x["shape"][0])
        d["in_channels"] = int(x["shape"][1]) // 4 - 1  # (latent + padding mask) x 2x2 patch
    k = sub.get("blocks.0.cross_attn.k_proj.weight")
    if k:
        d["context"] = int(k["shape"][1])
    adapter = {m.group(1) for key in sub if (m := re.match(r"^llm_adapter\.blocks\.(\d+)\.", key))}
    if adapter:
        d["adapter_blocks"] = len(adapter)
    return d


def _lora_details(header: dict, meta: dict) -> dict:
    keys = list(header)
    d: dict = {}
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        d["format"] = "kohya"
    elif any(k.startswith("lycoris_") for k in keys):
        d["format"] = "lycoris"
    elif any(".lora_A" in k or ".lora_B" in k for k in keys):
        d["format"] = "peft"
    else:
        d["format"] = "comfy"
    algos = []
    for algo, marks in (("lora", (".lora_down", ".lora_A", ".lora.down", "_lora.down")), ("loha", (".hada_",)),
                        ("lokr", (".lokr_",)), ("oft", (".oft_",)), ("diff", (".diff",))):
        if any(m in k for k in keys for m in marks):
            algos.append(algo)
    d["algo"] = "+".join(algos) or "?"
    for k in keys:
        if k.endswith((".lora_down.weight", ".lora_A.weight")) and len(header[k]["shape"]) >= 1:
            d["rank"] = int(header[k]["shape"][0])
            break
    d["alpha"] = any(k.endswith(".alpha") for k in keys)
    targets = []
    adapter = ("llm_adapter", "text_conditioner.")  # diffusers names the adapter `text_conditioner`
    if any(a in k for k in keys for a in adapter):
        targets.append("adapter")
    if any(k.startswith(("lora_te", "text_encoders.")) for k in keys):
        targets.append("te")
    if any("blocks" in k and not any(a in k for a in adapter) and not k.startswith(("lora_te", "text_encoders."))
           for k in keys):
        targets.insert(0, "dit")
    d["targets"] = "+".join(targets) or "?"
    if meta.get("ss_base_model_version"):
        d["base"] = meta["ss_base_model_version"]
    return d


def classify_header(header: dict, meta: dict) -> tuple[str, dict]:
    """(kind, details) from a parsed safetensors header; see `classify`."""
    keys = [k for k in header if not is_ignored_key(k)]
    details: dict = {"tensors": len(header), "dtype": _dtype_summary(header)}
    if not keys:
        return "unknown", {**details, "note": "no tensors"}
    details["prefix"] = vote_prefix(keys)
    if sum(map(_key_is_adapter, keys)) * 2 >= len(keys) or (
        any(map(_key_is_adapter, keys)) and all(_key_is_adapter(k) or k.endswith(".alpha") for k in keys)
    ):
        return "lora", {**details, **_lora_details(header, meta)}
    quant = _quant(header, meta)
    if quant:
        details["quant"] = quant

    keyset = set(keys)
    found = identify(keyset)
    if found is None:
        return "unknown", details
    fmt, pre = found
    sub = {k[len(pre):]: header[k] for k in keys if k.startswith(pre)}
    details["prefix"] = pre
    components = [f.kind for f in COMPONENT_FILES if f.prefix_in(keyset) is not None]
    if fmt is DIT_FILE and len(components) > 1:
        return "aio", {**details, "components": "+".join(components), **_dit_details(sub)}
    if fmt not in COMPONENT_FILES:
        details["note"] = f"{fmt.label}; {fmt.fix}"
    if fmt.kind in ("dit", "cosmos_dit"):
        details |= _dit_details(sub)
    elif fmt.kind == "diffusers_dit":
        details["blocks"] = len({k.split(".")[1] for k in sub if k.startswith("transformer_blocks.")})
    elif fmt is TE_FILE:
        details["prefix"] = pre.removesuffix("model.")  # shown as the wrapper around the Hugging Face names
        layers = {m.group(1) for k in sub if (m := re.match(r"layers\.(\d+)\.", k))}
        norm = sub.get("layers.0.post_attention_layernorm.weight")
        emb = sub.get("embed_tokens.weight")
        details["layers"] = len(layers)
        if norm:
            details["width"] = int(norm["shape"][0])
        if emb:
            details["vocab"] = int(emb["shape"][0])
    elif fmt is VAE_FILE:
        if "encoder.conv1.weight" in sub:
            details["base_dim"] = int(sub["encoder.conv1.weight"]["shape"][0])
        if "conv2.weight" in sub:
            details["z_dim"] = int(sub["conv2.weight"]["shape"][0])
    return fmt.kind, details


def classify(path: str | os.PathLike) -> FileInfo:
    """Identify a model file from its header alone (formats.md §1.7); tensors are never read.

    Damaged, pickled and GGUF files other than an Anima DiT come back as kinds 'broken', 'pickle' and 'gguf' with the
    reason in details['error'] / details['unsupported']; a GGUF Anima DiT is a 'dit' with details['format'] 'gguf'.
    Only a missing path raises CheckpointError.
    """
    p = Path(path)
    if p.is_symlink() and not p.exists():  # a dangling link in a models folder is one bad row, not a failed listing
        return FileInfo(p, "broken", {"error": f"{p}: a link to a missing file ({os.readlink(p)}); fix or remove it"}, 0)
    if not p.exists():
        raise CheckpointError(f"{p}: file not found; check the path or run `rdbt models` to see what rdbt finds")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a model file")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as err:  # unreadable (permissions, I/O error): one row, not the end of the listing
        return FileInfo(p, "broken", {"error": f"{p}: cannot read ({err.strerror}); check its permissions"}, size)
    if magic == b"GGUF" or p.suffix.lower() == ".gguf":
        details = _gguf_details(p)
        kind = "broken" if "error" in details else "gguf" if "unsupported" in details else "dit"
        return FileInfo(p, kind, details, size)
    if p.suffix.lower() in PICKLE_SUFFIXES + (".pt2",):
        why = "pickle checkpoint: never loaded (can run code); convert it to .safetensors"
        return FileInfo(p, "pickle", {"unsupported": why}, size)
    try:
        header, meta = read_safetensors_header(p)
    except CheckpointError as err:
        return FileInfo(p, "broken", {"error": str(err)}, size)
    except OSError as err:
        return FileInfo(p, "broken", {"error": f"{p}: cannot read ({err.strerror}); check its permissions"}, size)
    kind, details = classify_header(header, meta)
    return FileInfo(p, kind, details, size)


# GGUF: only the key/value table and the tensor table are read (ggml type ids from ggml.h / gguf.GGMLQuantizationType).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
               11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
               19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
               27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0"}
# general.file_type, the name llama.cpp's quantiser gives the whole file (gguf.LlamaFileType): a Q5_K_M file mixes
# Q5_K and Q6_K tensors, so the tensor types alone do not name it.
_GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
                    18: "Q6_K", 32: "BF16"}
GGUF_TE_NOTE = ("a GGUF text encoder; rdbt reads GGUF only for the diffusion model, pass the "
                "qwen_3_06b_base.safetensors text encoder")


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether the file is GGUF by its magic or by its name (a .gguf file with a damaged magic is a damaged GGUF, so
    that is what its error says)."""
    if Path(path).suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf_details(p: Path) -> dict:
    """What the header of a GGUF file tells (formats.md §1.6): arch, file type, tensor types, and for an Anima DiT its
    blocks and width. An Anima DiT is kind 'dit' (rdbt loads it); other GGUF files say why not in 'unsupported'."""
    from gguf import GGML_QUANT_SIZES  # numpy only; (values per block, bytes per block) of every ggml type

    d: dict = {"format": "gguf"}
    by_type: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    sizes = {int(t): v for t, v in GGML_QUANT_SIZES.items()}
    alignment = 32  # GGUF's default
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            def take(fmt):
                n = struct.calcsize(fmt)
                b = f.read(n)
                if len(b) < n:
                    raise EOFError
                return struct.unpack(fmt, b)[0]

            def string():
                n = take("<Q")
                if n > 1 << 20:
                    raise ValueError("a string longer than 1 MB")
                return f.read(n).decode("utf-8", "replace")

            def value(t):
                if t == 8:
                    return string()
                if t == 9:
                    et, n = take("<I"), take("<Q")
                    if n > size:
                        raise ValueError("an array longer than the file")
                    if et == 8:
                        for _ in range(n):
                            string()
                    else:
                        f.seek(struct.calcsize(_GGUF_SCALARS[et]) * n, 1)
                    return None
                return take(_GGUF_SCALARS[t])

            if f.read(4) != b"GGUF":
                raise ValueError("it does not start with GGUF's magic bytes")
            d["version"] = take("<I")
            n_tensors, n_kv = take("<Q"), take("<Q")
            if n_tensors > size or n_kv > size:
                raise ValueError("more tensors or keys than the file has bytes")
            for _ in range(n_kv):
                key = string()
                v = value(take("<I"))
                if key == "general.architecture":
                    d["arch"] = v
                elif key == "general.file_type" and isinstance(v, int):
                    d["file_type"] = _GGUF_FILE_TYPES.get(v, str(v))
                elif key == "general.alignment" and isinstance(v, int) and v > 0:
                    alignment = v
            end = 0
            for _ in range(n_tensors):
                name = string()
                n_dims = take("<I")
                if n_dims > 8:
                    raise ValueError("a tensor with more than 8 dimensions")
                dims = [take("<Q") for _ in range(n_dims)]
                type_id, offset = take("<I"), take("<Q")
                kind = _GGML_TYPES.get(type_id, "?")
                shapes[name] = dims[::-1]  # ggml lists the fastest dimension first; torch the slowest
                by_type[kind] = by_type.get(kind, 0) + _numel(dims)
                block, nbytes = sizes.get(type_id, (1, 0))
                end = max(end, offset + _numel(dims) // block * nbytes)
            data_start = -(-f.tell() // alignment) * alignment
    except (EOFError, struct.error):
        return {**d, "error": f"{p}: truncated GGUF header; download the file again"}
    except (ValueError, KeyError) as err:  # KeyError: a value type GGUF does not have
        why = str(err) if isinstance(err, ValueError) else f"unknown value type {err}"
        return {**d, "error": f"{p}: damaged GGUF header ({why}); download the file again"}
    except OSError as err:
        return {**d, "error": f"{p}: cannot read ({err.strerror}); check its permissions"}
    if end and data_start + end > size:
        return {**d, "error": f"{p}: its tensors need {data_start + end:,} bytes but the file has {size:,}: a "
                              "truncated or damaged GGUF file; download it again"}
    d["types"] = "+".join(sorted(by_type, key=lambda k: -by_type[k]))
    # The file's own name for its quantisation, else its most common tensor type (Q4_K for most of a Q4_K_M file).
    d["quant"] = d.pop("file_type", None) or next(iter(sorted(by_type, key=lambda k: -by_type[k])), "?")
    names = set(shapes)
    found = identify(names)
    if found and found[0].kind in ("dit", "cosmos_dit"):
        fmt, pre = found
        sub = {n[len(pre):]: {"shape": s} for n, s in shapes.items() if n.startswith(pre)}
        d["prefix"] = pre
        d |= _dit_details(sub)
        d["component"] = fmt.kind
        if fmt is not DIT_FILE:
            d["unsupported"] = f"{fmt.label}; {fmt.fix}"
    elif any(n.startswith(("blk.0.attn_q", "token_embd")) for n in names):  # llama.cpp names (formats.md §1.6)
        d["component"] = "te"
        d["unsupported"] = GGUF_TE_NOTE
    else:
        d["unsupported"] = "not an Anima diffusion model; rdbt reads GGUF only for Anima's diffusion model"
    return d


def check_model_file(path: str | os.PathLike, kind: str = "dit") -> None:
    """Fail now, with the file's name and the fix, on a file that cannot load as `kind`: truncated, pickled, or a
    GGUF file that is no Anima DiT. Reads the header only."""
    if kind != "dit" or not is_gguf(path):
        read_safetensors_header(path)
        return
    d = _gguf_details(Path(path))
    if "error" in d or "unsupported" in d:
        raise CheckpointError(d.get("error") or f"{path}: {d['unsupported']}")


def format_record(path: str | os.PathLike) -> dict:
    """How a recipe names a model file's storage when it is not plain safetensors: {'format': 'gguf', 'quant':
    'Q5_K_M'} (the quantisation decides the image as much as the file does); {} otherwise."""
    if not is_gguf(path):
        return {}
    return {"format": "gguf", "quant": _gguf_details(Path(path)).get("quant")}


# ---------------------------------------------------------------------------------------------------------------------
# models folders
# ---------------------------------------------------------------------------------------------------------------------

# ComfyUI folder keys and their directories (folder_paths.py), plus A1111/Forge names (formats.md §1.2).
KIND_FOLDERS = {
    "dit": ("diffusion_models", "unet", "checkpoints", "Stable-diffusion"),
    "te": ("text_encoders", "clip", "text_encoder"),
    "vae": ("vae", "VAE"),
    "lora": ("loras", "Lora", "LyCORIS"),
}
LAYOUT_FOLDERS = frozenset(n for names in KIND_FOLDERS.values() for n in names) | {"tokenizers"}
# Which sniffed kinds can serve as each component (an AIO file carries all three).
SERVES = {"dit": ("dit", "aio"), "te": ("te", "aio"), "vae": ("vae", "aio"), "lora": ("lora",)}
KIND_LABELS = {"dit": "diffusion model (DiT)", "te": "text encoder", "vae": "VAE", "lora": "LoRA"}
_YAML_KINDS = ("checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae", "loras")


def default_models_dir() -> Path:
    """Where `rdbt download` puts files when no folder is named (the data folder, not the config one); searched last,
    after the config folder's models/ where earlier versions downloaded to."""
    return data_dir() / "models"


def models_dirs(
    flag: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    env: Mapping[str, str] = os.environ,
    *,
    home: str | os.PathLike | None = None,
    comfy_roots: Sequence[str | os.PathLike] | None = None,
    a1111_roots: Sequence[str | os.PathLike] | None = None,
) -> list[Path]:
    """The models folders to search, first wins: --models-dir, else $RDBT_MODELS, else installs found on disk.

    An explicit flag or env var replaces the automatic search, so what the user names is all that is used.
    Automatic: ComfyUI (`<root>/models` and the folders of `<root>/extra_model_paths.yaml`), then A1111/Forge
    (`<root>/models`), then `default_models_dir()`. Only existing folders are returned.
    """
    if flag:
        flags = [flag] if isinstance(flag, (str, os.PathLike)) else list(flag)
        out = []
        for item in flags:
            for part in str(item).split(os.pathsep):
                if not part:
                    continue
                d = Path(part).expanduser()
                if not d.is_dir():
                    raise ConfigError(f"--models-dir {d}: no such folder; point it at a ComfyUI-style models folder")
                out.append(d)
        return dedupe(out)
    if env.get("RDBT_MODELS"):
        dirs = [Path(p).expanduser() for p in env["RDBT_MODELS"].split(os.pathsep) if p]
        found = [d for d in dirs if d.is_dir()]
        if not found:  # one unmounted folder among several is skipped; a variable naming none is a mistake
            raise ConfigError(f"RDBT_MODELS={env['RDBT_MODELS']}: no such folder; fix the variable or unset it")
        return dedupe(found)
    base = Path(home).expanduser() if home is not None else Path.home()
    if comfy_roots is None:
        comfy_roots = [base / "ComfyUI", base / "comfy" / "ComfyUI", base / "Documents" / "ComfyUI"]
    if a1111_roots is None:
        a1111_roots = [base / "stable-diffusion-webui", base / "stable-diffusion-webui-forge"]
    found: list[Path] = []
    for root in map(Path, comfy_roots):
        found.append(root / "models")
        yaml_path = root / "extra_model_paths.yaml"
        if yaml_path.is_file():
            found.extend(extra_model_paths(yaml_path))
    found.extend(Path(r) / "models" for r in a1111_roots)
    found += [default_models_dir(), user_dir() / "models"]
    return dedupe(found)


def dedupe(paths: Iterable[Path]) -> list[Path]:
    """The existing folders among `paths`, each real folder once, in order."""
    out, seen = [], set()
    for p in paths:
        if not p.is_dir():
            continue
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out




def extra_model_paths(yaml_path: str | os.PathLike) -> list[Path]:
    """Model folders listed in a ComfyUI `extra_model_paths.yaml` (base_path + per-kind folders, `|` lists)."""
    yaml_path = Path(yaml_path)
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    try:
        import yaml  # optional; the fallback reads the subset ComfyUI's example uses

        data = yaml.safe_load(text)
    except ImportError:
        data = parse_simple_yaml(text)
    except Exception:  # a broken user file must not break model discovery
        data = parse_simple_yaml(text)
    out: list[Path] = []
    if not isinstance(data, dict):
        return out
    for section in data.values():
        if not isinstance(section, dict):
            continue
        base = section.get("base_path")
        base = Path(os.path.expandvars(os.path.expanduser(str(base)))) if base else yaml_path.parent
        if not base.is_absolute():
            base = yaml_path.parent / base  # ComfyUI resolves a relative base_path against the yaml's folder
        for kind in _YAML_KINDS:
            value = section.get(kind)
            if not value:
                continue
            for line in str(value).splitlines():
                line = line.strip()
                if line:
                    out.append(base / os.path.expandvars(os.path.expanduser(line)))
    return out


def parse_simple_yaml(text: str) -> dict:
    """The nested `section: {key: value}` YAML subset of extra_model_paths.yaml, with `|` block values."""
    data: dict = {}
    section = None
    block_key, block_indent, block_lines = None, 0, []

    def close_block():
        if section is not None and block_key is not None:
            data[section][block_key] = "\n".join(block_lines)

    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if block_key is not None:
            if indent > block_indent:
                block_lines.append(line.strip())
                continue
            close_block()
            block_key, block_lines = None, []
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        value = value.strip().strip("'\"")
        if indent == 0:
            section = key.strip()
            data[section] = {}
        elif section is not None:
            if value in ("|", "|-", ">"):
                block_key, block_indent = key.strip(), indent
            else:
                data[section][key.strip()] = value
    close_block()
    return data


def _walk_models(folder: Path) -> Iterable[Path]:
    """Model files under `folder`, following symlinked subfolders once (users link shared model stores)."""
    seen: set[str] = set()
    for root, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(MODEL_SUFFIXES) and not name.startswith("."):
                yield Path(root) / name


def _kind_folders(kind: str, d: Path) -> list[Path]:
    """The folders of `kind` under a models folder `d`; a folder that is itself a kind folder (or flat) is used whole."""
    subs = [d / name for name in KIND_FOLDERS[kind] if (d / name).is_dir()]
    if kind in ("te", "vae") and (d / "checkpoints").is_dir():
        subs.append(d / "checkpoints")  # all-in-one files; their headers are checked like a flat folder's
    if subs:
        return subs
    if d.name in KIND_FOLDERS[kind]:
        return [d]
    if d.name in LAYOUT_FOLDERS or any((d / n).is_dir() for n in LAYOUT_FOLDERS):
        return []  # a folder of another kind, or a layout root without this kind
    return [d]  # a flat folder of mixed files: candidates are checked by sniffing


def inventory(dirs: Sequence[str | os.PathLike]) -> list[FileInfo]:
    """Every model file under `dirs` (recursively), classified by its header, with size and cached AutoV2."""
    out, seen = [], set()
    for d in map(Path, dirs):
        for f in _walk_models(d):
            real = os.path.realpath(f)
            if real in seen:
                continue
            seen.add(real)
            info = classify(f)
            cached = cached_hashes(f)
            out.append(FileInfo(info.path, info.kind, info.details, info.size, cached["autov2"] if cached else None))
    return out


def resolve_component(kind: str, name_or_path: str | os.PathLike | None, dirs: Sequence[str | os.PathLike]) -> Path:
    """The file for one component ('dit', 'te', 'vae', 'lora'): a path as is, a name by stem, or the only one found.

    Names match stems (or paths relative to the kind's folder) case-insensitively: an exact match first (the earliest
    folder wins), then a unique prefix. With no name, the single file whose header shows that kind.
    """
    if kind not in KIND_FOLDERS:
        raise ConfigError(f"unknown component {kind!r}; choose one of {', '.join(KIND_FOLDERS)}")
    label = KIND_LABELS[kind]
    dirs = [Path(d) for d in dirs]
    if name_or_path is not None and str(name_or_path).strip():
        name = str(name_or_path).strip()
        p = Path(name).expanduser()
        if p.is_file():
            return p
        if p.is_absolute() or name.startswith((".", "~")) or p.suffix.lower() in MODEL_SUFFIXES and os.sep in name:
            raise CheckpointError(f"{p}: {label} file not found; check the path or run `rdbt models`")
        return _resolve_name(kind, name, dirs)
    candidates, looked = _candidates(kind, dirs)
    sniffed = [(f, classify(f)) for f in candidates]
    hits = [f for f, info in sniffed if info.kind == kind]
    if not hits and kind != "lora":
        hits = [f for f, info in sniffed if info.kind == "aio" and kind in info.details.get("components", "")]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        names = ", ".join(str(h) for h in hits[:12]) + (" ..." if len(hits) > 12 else "")
        raise ConfigError(f"several {label} files found ({names}); pick one by name or path")
    raise CheckpointError(_not_found(label, None, looked))


def _candidates(kind: str, dirs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(files, folders searched) for `kind`, earliest folder first, each file once; files in flat folders are
    kept only when their header serves this kind."""
    files, looked, seen = [], [], set()
    for d in dirs:
        for folder in _kind_folders(kind, d):
            looked.append(folder)
            typed = folder.name in KIND_FOLDERS[kind]
            for f in _walk_models(folder):
                real = os.path.realpath(f)
                if real in seen:
                    continue
                if not typed and classify(f).kind not in SERVES[kind]:
                    continue
                seen.add(real)
                files.append(f)
    return files, looked


def _named(files: Sequence[Path], looked: Sequence[Path]) -> list[tuple[Path, str]]:
    """Each file with its name inside the kind folder it was found in, without the suffix (`styles/ink`)."""
    out = []
    for f in files:
        base = next((d for d in looked if f.is_relative_to(d)), f.parent)
        out.append((f, f.relative_to(base).with_suffix("").as_posix()))
    return out


def kind_files(kind: str, dirs: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """The files that can serve as `kind` under the models folders `dirs`, each with the name it answers to."""
    return _named(*_candidates(kind, [Path(d) for d in dirs]))


def comfy_name(path: str | os.PathLike, kind: str, dirs: Sequence[str | os.PathLike] = ()) -> str:
    """The name ComfyUI's loaders list a file of `kind` under: its path inside the kind's folder, '/'-separated
    (`style/x.safetensors` for loras/style/x.safetensors). The folder is found among the models folders `dirs` (as
    discovery searches them), else as the nearest folder above the file named like a kind folder (loras/,
    diffusion_models/, ...); else the name is the file name."""
    p = Path(os.path.abspath(path))
    roots = [Path(os.path.abspath(f)) for d in map(Path, dirs) for f in _kind_folders(kind, d)]
    roots += [parent for parent in p.parents if parent.name in KIND_FOLDERS[kind]]
    for root in roots:
        if p.is_relative_to(root):
            return p.relative_to(root).as_posix()
    return p.name


def _resolve_name(kind: str, name: str, dirs: Sequence[Path]) -> Path:
    label = KIND_LABELS[kind]
    want = name.lower().replace("\\", "/")
    for suffix in MODEL_SUFFIXES:
        if want.endswith(suffix):
            want = want[: -len(suffix)]
            break
    files, looked = _candidates(kind, dirs)
    names = [(f, {f.stem.lower(), rel.lower()}) for f, rel in _named(files, looked)]
    exact = [f for f, keys in names if want in keys]
    if exact:
        return exact[0]
    prefix = [f for f, keys in names if any(k.startswith(want) for k in keys)]
    if len(prefix) == 1:
        return prefix[0]
    if prefix:
        listed = ", ".join(f.stem for f in prefix[:12]) + (" ..." if len(prefix) > 12 else "")
        raise ConfigError(f"{label} name {name!r} is ambiguous: {listed}; give more of the name or a path")
    raise CheckpointError(_not_found(label, name, looked))


def _not_found(label: str, name: str | None, looked: Sequence[Path]) -> str:
    what = f"no {label} named {name!r}" if name else f"no {label} file found"
    where = ", ".join(str(p) for p in looked[:6]) + (" ..." if len(looked) > 6 else "") if looked else "no models folder"
    return (f"{what} (looked in {where}); pass a path, point --models-dir or RDBT_MODELS at your models folder, "
            "or fetch the official files with `rdbt download`")


# ---------------------------------------------------------------------------------------------------------------------
# hashes (formats.md §4.1-§4.2): AutoV2 = sha256(file)[:10]; AutoV3 = A1111 "addnet" = sha256(after header)[:12]
# ---------------------------------------------------------------------------------------------------------------------

CHUNK = 1 << 20
_CACHE_VERSION = 1


def _hash_file(path: Path) -> dict:
    """sha256 of the whole file and of the bytes after the safetensors header, in one streaming pass."""
    full, body = hashlib.sha256(), hashlib.sha256()
    size = path.stat().st_size
    data_start = None
    pos = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if pos == 0 and len(chunk) >= 8 and chunk[:4] != b"GGUF":
                (n,) = struct.unpack("<Q", chunk[:8])
                if 8 + n <= size:
                    data_start = 8 + n
            full.update(chunk)
            if data_start is not None and pos + len(chunk) > data_start:
                body.update(chunk[max(0, data_start - pos):])
            pos += len(chunk)
    return {"sha256": full.hexdigest(), "addnet": body.hexdigest() if data_start is not None else None}


def _cache_path() -> Path:
    return user_dir() / "hashes.json"


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save_cache(files: dict) -> None:
    path = _cache_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "files": files}, indent=0), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only config folder only costs re-hashing next time


def _stamp(p: Path) -> tuple[str, int, int]:
    st = p.stat()
    return os.path.abspath(p), st.st_size, st.st_mtime_ns


def _expand(p: Path, raw: dict) -> dict:
    sha, addnet = raw["sha256"], raw.get("addnet")
    lora = addnet[:12] if addnet else None
    if addnet:
        try:
            # A1111 writes the trainer's `sshs_model_hash` for a LoRA when the file carries one (formats.md §4.1).
            _, meta = read_safetensors_header(p)
            if isinstance(meta.get("sshs_model_hash"), str) and len(meta["sshs_model_hash"]) >= 12:
                lora = meta["sshs_model_hash"][:12].lower()
        except CheckpointError:
            pass
    return {"sha256": sha, "autov2": sha[:10], "autov3": addnet[:12] if addnet else None, "a1111_lora": lora,
            "sha256_12": sha[:12]}


def cached_hashes(path: str | os.PathLike) -> dict | None:
    """`file_hashes(path)` if the cache already holds them for this size and mtime, else None (never hashes)."""
    p = Path(path)
    try:
        key, size, mtime = _stamp(p)
    except OSError:
        return None
    entry = _load_cache().get(key)
    # Another process, an older rdbt or a hand edit may have left anything here: a wrong-typed entry is a miss, and
    # file_hashes rewrites it.
    if (isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime
            and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
            and isinstance(entry.get("addnet"), (str, type(None)))):
        return _expand(p, entry)
    return None


def file_hashes(path: str | os.PathLike) -> dict:
    """{'sha256', 'autov2', 'autov3', 'a1111_lora', 'sha256_12'} of a model file, cached in user_dir()/hashes.json
    by (absolute path, size, mtime) so a multi-GB file is read once. autov3/a1111_lora are None for non-safetensors."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found, cannot hash it")
    hit = cached_hashes(p)
    if hit:
        return hit
    key, size, mtime = _stamp(p)
    raw = _hash_file(p)
    files = _load_cache()
    files[key] = {"size": size, "mtime_ns": mtime, **raw}
    _save_cache(files)
    return _expand(p, raw)


def short_hash(path: str | os.PathLike) -> str:
    """AutoV2: the first 10 hex of the file's sha256 (A1111 `Model hash`, Civitai)."""
    return file_hashes(path)["autov2"]


# ---------------------------------------------------------------------------------------------------------------------
# downloads (formats.md §1.1 and §5)
# ---------------------------------------------------------------------------------------------------------------------

ANIMA_REPO = "circlestone-labs/Anima"
DIT_VARIANTS = {
    "base": "anima-base-v1.0",
    "turbo": "anima-turbo-v1.1",
    "turbo-v1.0": "anima-turbo-v1.0",
    "aesthetic": "anima-aesthetic-v1.1",
    "aesthetic-v1.0": "anima-aesthetic-v1.0",
    "preview3": "anima-preview3-base",
    "preview2": "anima-preview2",
    "preview": "anima-preview",
}
# (repo, file in repo, folder under models_dir); the tokenizers come from their Apache-2.0 upstreams (formats.md §5).
OFFICIAL_FILES = {
    "te": [(ANIMA_REPO, "split_files/text_encoders/qwen_3_06b_base.safetensors", "text_encoders")],
    "vae": [(ANIMA_REPO, "split_files/vae/qwen_image_vae.safetensors", "vae")],
    "tokenizers": [
        ("Qwen/Qwen3-0.6B-Base", "tokenizer.json", "tokenizers/qwen"),
        ("google-t5/t5-base", "tokenizer.json", "tokenizers/t5"),
    ],
    # The official Turbo LoRA, which the `turbo` preset applies at 0.3.
    "turbo-lora": [("circlestone-labs/Anima-Official-LoRAs", "anima-turbo-lora-v0.2.safetensors", "loras")],
}
DOWNLOAD_PARTS = ("dit", *OFFICIAL_FILES)
DEFAULT_DOWNLOAD = ("dit", "te", "vae", "tokenizers")


def official_plan(components: Sequence[str] = DEFAULT_DOWNLOAD, variant: str = "base"):
    """[(repo, file in repo, folder under models_dir)] for the chosen components."""
    plan = []
    for comp in components:
        if comp == "dit":
            if variant not in DIT_VARIANTS:
                raise ConfigError(f"unknown Anima variant {variant!r}; choose one of {', '.join(DIT_VARIANTS)}")
            plan.append((ANIMA_REPO, f"split_files/diffusion_models/{DIT_VARIANTS[variant]}.safetensors", "diffusion_models"))
        elif comp in OFFICIAL_FILES:
            plan.extend(OFFICIAL_FILES[comp])
        else:
            raise ConfigError(f"unknown component {comp!r} to download; choose from {', '.join(DOWNLOAD_PARTS)}")
    return plan


def check_network(endpoint: str | None = None, timeout: float = 5.0) -> None:
    """Raise a one-line error at once when Hugging Face (or the proxy in between) cannot be reached, instead of letting
    huggingface_hub retry for half a minute and fail with a page of chatter."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise CheckpointError("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it, or copy the files into the "
                              "models folder by hand")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        reason = f"no answer in {timeout:g} s" if isinstance(err, TimeoutError) else err.strerror or type(err).__name__
        via = f"the proxy {url.hostname}:{port}" if proxy else endpoint
        raise CheckpointError(f"cannot reach {via} ({reason}); rdbt download needs the network: check the connection "
                              "or proxy and run it again (finished files are kept)") from None


def download_official(
    models_dir: str | os.PathLike,
    components: Sequence[str] = DEFAULT_DOWNLOAD,
    *,
    variant: str = "base",
) -> list[Path]:
    """Fetch the official Anima files into `models_dir` in ComfyUI layout; files already there are kept.

    Downloads go through huggingface_hub (progress bars, resume) into `models_dir/.rdbt-download/<repo>/` and are
    moved into place only when complete, so an interrupted run resumes and never leaves a half file in the layout.
    """
    plan = official_plan(components, variant)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hf_logging
    except ImportError:
        raise ConfigError("downloads need huggingface_hub: pip install huggingface_hub") from None
    root = Path(models_dir).expanduser()
    if not all((root / folder / Path(name).name).is_file() for _, name, folder in plan):
        check_network()
    hf_logging.set_verbosity_error()  # its retry warnings; a failure still ends in one line below
    out = []
    for repo, filename, folder in plan:
        target = root / folder / Path(filename).name
        if target.is_file():
            out.append(target)
            continue
        staging = root / ".rdbt-download" / repo.replace("/", "--")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            got = Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=staging))
            os.replace(got, target)
        except Exception as err:  # network, auth, disk: all reach the user as one line
            first = " ".join(str(err).split())[:200] or type(err).__name__
            raise CheckpointError(
                f"download of {repo}/{filename} into {target.parent} failed: {first}; "
                "check the connection (and HF_TOKEN if the repo asks for it), then run `rdbt download` again to resume"
            ) from None
        out.append(target)
    return out
