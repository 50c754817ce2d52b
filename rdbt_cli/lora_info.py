"""What a LoRA file says about its training: the `ss_*` keys kohya's sd-scripts (and trainers copying it) write into
the safetensors header, and the `modelspec.*` keys of the SAI model spec. Read from the header only; no torch.

A stranger's file is read as untrusted: the header is bounded and checked by discovery.read_safetensors_header
(length, a table of strings), every shown value is cut to a line and stripped of control characters (a terminal
escape in a tag must not reach the terminal), and the nested JSON of `ss_tag_frequency` is parsed only when small
and kept only where it has the expected shape (dataset -> tag -> count).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rdbt_cli import discovery

SHOWN_TAGS = 12  # the most frequent training tags shown
_MAX_VALUE = 200  # characters of one shown value
_MAX_TAG_JSON = 8 << 20  # ss_tag_frequency larger than this is not parsed (real ones are kilobytes)

# (label, keys tried in order): the readable selection, in the order shown.
FIELDS = [
    ("title", ("modelspec.title", "ss_output_name")),
    ("base model", ("ss_base_model_version", "modelspec.architecture")),
    ("trained on", ("ss_sd_model_name",)),
    ("trigger words", ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words", "trigger_phrase")),
    ("network", ("ss_network_module",)),
    ("dim", ("ss_network_dim",)),
    ("alpha", ("ss_network_alpha",)),
    ("network args", ("ss_network_args",)),
    ("resolution", ("ss_resolution", "modelspec.resolution")),
    ("epochs", ("ss_num_epochs", "ss_epoch")),
    ("steps", ("ss_steps", "ss_max_train_steps")),
    ("images", ("ss_num_train_images",)),
    ("learning rate", ("ss_learning_rate", "ss_unet_lr")),
    ("optimizer", ("ss_optimizer",)),
    ("trained", ("ss_training_finished_at", "ss_training_started_at", "modelspec.date")),
    ("author", ("modelspec.author",)),
    ("description", ("modelspec.description",)),
]

# Model families by what their trainers write in ss_base_model_version / modelspec.architecture (sd-scripts'
# model_util and sai_model_spec names) or in the base model's file name (regular expressions, first match wins:
# Animagine XL is an SDXL model whose name begins like Anima's).
_FAMILIES = [
    ("animagine", "SDXL (Animagine)"), ("anima", "Anima"), ("cosmos", "Anima"),
    ("sdxl", "SDXL"), ("stable-diffusion-xl", "SDXL"), ("pony", "SDXL (Pony)"), ("illustrious", "SDXL (Illustrious)"),
    ("noobai", "SDXL (NoobAI)"), ("flux", "Flux"), ("sd3", "SD3"), ("stable-diffusion-3", "SD3"),
    ("sd_v2", "SD 2"), ("stable-diffusion-v2", "SD 2"), ("sd_v1", "SD 1.5"), ("stable-diffusion-v1", "SD 1.5"),
    ("lumina", "Lumina"), ("chroma", "Chroma"), ("hunyuan", "Hunyuan"), ("qwen[-_]image", "Qwen-Image"),
    ("hidream", "HiDream"), ("z[-_]image", "Z-Image"),
]
# C0/C1 controls (terminal escapes), line separators and bidirectional overrides (text that reads back to front)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: str, limit: int = _MAX_VALUE) -> str:
    """One value fit to show: control characters as \\xNN escapes, newlines as spaces, at most `limit` characters."""
    text = _CONTROL.sub(lambda m: _escape(ord(m.group())), value.replace("\r\n", " ").replace("\n", " "))
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt(label: str, value: str) -> str:
    if label == "trained" and re.fullmatch(r"\d{9,11}(\.\d+)?", value.strip()):
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(value)))
    if label == "network args":
        try:
            args = json.loads(value) if len(value) < 4096 else None
        except (ValueError, RecursionError):
            args = None
        if isinstance(args, dict):
            value = ", ".join(f"{k}={v}" for k, v in args.items() if isinstance(v, (str, int, float)))
    return clean(value)


def top_tags(meta: dict, n: int = SHOWN_TAGS) -> list[tuple[str, int]]:
    """The `n` most frequent training tags over all datasets of ss_tag_frequency; [] when absent or malformed."""
    raw = meta.get("ss_tag_frequency")
    if not isinstance(raw, str) or len(raw) > _MAX_TAG_JSON:
        return []
    try:
        table = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    counts: dict[str, int] = {}
    for tags in table.values() if isinstance(table, dict) else ():
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            if isinstance(tag, str) and isinstance(count, int) and not isinstance(count, bool) and count > 0:
                key = tag.strip()
                counts[key] = counts.get(key, 0) + count
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [(clean(tag, 60), count) for tag, count in ranked[:n] if tag]


def family(meta: dict) -> tuple[str, str] | None:
    """(family, the key that says so) from the training metadata; None when it names no family rdbt knows."""
    for keys in (("ss_base_model_version", "modelspec.architecture"), ("ss_sd_model_name",)):
        for key in keys:
            value = meta.get(key)
            if isinstance(value, str) and value.strip():
                low = value.lower()
                found = next((name for mark, name in _FAMILIES if re.search(mark, low)), None)
                if found:
                    return found, key
    return None


def describe(path) -> dict:
    """A safetensors file's kind (as `rdbt models` sniffs it) and its training metadata, for `inspect` / `models`.

    {"path", "kind", "details", "training": {label: value}, "tags": [[tag, count]], "warning": str | None,
    "metadata_keys": count}. Raises CheckpointError for a file that is not a whole safetensors file."""
    header, meta = discovery.read_safetensors_header(path)
    kind, details = discovery.classify_header(header, meta)
    training = {}
    for label, keys in FIELDS:
        value = next((meta[k] for k in keys if isinstance(meta.get(k), str) and meta[k].strip()
                      and meta[k].strip().lower() not in ("none", "null")), None)
        if value is not None:
            training[label] = _fmt(label, value)
    warning = None
    said = family(meta)
    if said and said[0] != "Anima":
        warning = (f"{Path(path).name}: its metadata says it was trained for {said[0]} ({said[1]} "
                   f"{clean(meta[said[1]], 80)}), not Anima; its weights do not fit Anima's layers (rdbt refuses "
                   "keys that match nothing), so look for an Anima version of it")
    return {"path": str(path), "kind": kind, "details": {k: v for k, v in details.items() if k != "prefix"},
            "training": training, "tags": [list(t) for t in top_tags(meta)], "warning": warning,
            "metadata_keys": len(meta)}


def summary(info: dict) -> str:
    """describe()'s result as aligned lines."""
    details = ", ".join(f"{k} {v}" for k, v in info["details"].items() if v not in (None, "", False))
    rows = [("file", clean(info["path"], 400)), ("kind", f"{info['kind']} ({details})" if details else info["kind"])]
    rows += list(info["training"].items())
    if info["tags"]:
        rows.append(("top tags", ", ".join(f"{tag} ({count})" for tag, count in info["tags"])))
    if not info["training"] and not info["tags"]:
        rows.append(("training", "no training metadata in this file" if not info["metadata_keys"] else
                     f"none of the known keys among its {info['metadata_keys']} metadata keys"))
    if info["warning"]:
        rows.append(("warning", info["warning"]))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in rows)
