"""Prompt text -> token ids, exactly as ComfyUI's Anima text path makes them (spec/anima.md §3.2–§3.7).

ComfyUI's weight syntax is parsed first (comfy/sd1_clip.py token_weights); each weighted piece is tokenized on its own,
by the Qwen tokenizer (ids for the Qwen3 encoder, weights forced to 1) and by the T5 tokenizer (ids for the LLM
adapter's embedding, weights kept). No BOS, no chat template, no padding, no truncation. Tokenizers are read with the
`tokenizers` library; no torch here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rdbt_cli.config import user_dir
from rdbt_cli.errors import TokenizerNotFound

# ComfyUI swaps escaped parentheses for control characters before parsing and back afterwards (escape_important).
_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"
EMBEDDING_WORD = "embedding:"
# Current ComfyUI splits before an `embedding:` that follows whitespace and keeps the whitespace (spec §3.2); the
# goldens' older ComfyUI split at " embedding:" / "\nembedding:" and dropped that one character.
_EMBEDDING_SPLIT = re.compile(r"(?<=\s)" + re.escape(EMBEDDING_WORD))
_LEGACY_EMBEDDING_SPLIT = re.compile(r" embedding:|\nembedding:")

# Qwen2/Qwen3 pre-tokenizer split (the same regex their tokenizer.json carries); used for the vocab.json + merges.txt
# form, which has no pipeline of its own.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_PAD = "<|endoftext|>"
T5_EOS = "</s>"


# ---------------------------------------------------------------------------------------------------------------------
# Weight syntax
# ---------------------------------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    # Unbalanced input is kept, as ComfyUI's parse_parentheses keeps it: a stray ")" drives the depth negative and the
    # rest of the text stays in the current item; an unclosed "(" item never ends in ")" so it is plain text.
    items, cur, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if cur:
                    items.append(cur)
                cur = "("
            else:
                cur += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                items.append(cur + ")")
                cur = ""
            else:
                cur += ch
        else:
            cur += ch
    if cur:
        items.append(cur)
    return items


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for item in _split_top_level(text):
        if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
            inner = item[1:-1]
            w = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1 :])  # Python float(), as ComfyUI: " 1.2", "1e-1", "inf" all parse
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _weighted(inner, w)
        else:
            out.append((item, weight))
    return out


def parse_weights(prompt: str, *, legacy_embedding_split: bool = False) -> list[tuple[str, float]]:
    """The (text, weight) pieces ComfyUI tokenizes one by one, in order; empty pieces are dropped.

    `(x)` multiplies the weight by 1.1 per level, `(x:w)` sets it, `\\(` / `\\)` are literal parentheses, and a piece
    is split again before an `embedding:` that follows whitespace (the word stays text: Anima has no embeddings).
    `legacy_embedding_split` reproduces ComfyUI before the lookbehind split (it dropped the whitespace).
    """
    text = prompt.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)
    splitter = _LEGACY_EMBEDDING_SPLIT if legacy_embedding_split else _EMBEDDING_SPLIT
    pieces = []
    for segment, weight in _weighted(text, 1.0):
        segment = segment.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "(")
        parts = splitter.split(segment)
        parts = parts[:1] + [EMBEDDING_WORD + p for p in parts[1:]]
        pieces += [(p, weight) for p in parts if p]
    return pieces


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPrompt:
    qwen_ids: list[int]
    t5_ids: list[int]
    t5_weights: list[float]
    # ComfyUI's Qwen attention mask (sd1_clip process_tokens): leading pad ids and everything from the first pad id
    # after real text are 0. All ones for ordinary prompts; pass it to Qwen3Encoder.forward(ids, mask).
    qwen_mask: list[int] = field(default_factory=list)


def _qwen_from_vocab_merges(vocab_path: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges_path = vocab_path.with_name("merges.txt")
    if not merges_path.is_file():
        raise TokenizerNotFound(f"{vocab_path}: merges.txt is missing next to it; put the tokenizer's merges.txt there")
    tok = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # The special tokens live in tokenizer_config.json (ids 151643.. in Qwen's); without one, <|endoftext|> comes next.
    specials: dict[int, str] = {}
    config = vocab_path.with_name("tokenizer_config.json")
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        specials = {int(i): d["content"] for i, d in decoder.items()}
    if QWEN_PAD not in specials.values() and tok.token_to_id(QWEN_PAD) is None:
        specials[tok.get_vocab_size()] = QWEN_PAD
    for i in sorted(specials):
        if tok.token_to_id(specials[i]) is None:
            if i != tok.get_vocab_size():
                raise TokenizerNotFound(
                    f"{config}: special token {specials[i]!r} has id {i}, expected {tok.get_vocab_size()}; "
                    "use the tokenizer_config.json that came with this vocab.json"
                )
            tok.add_special_tokens([AddedToken(specials[i], special=True, normalized=False)])
    return tok


def load_tokenizer(path: str | Path, kind: str = "qwen"):
    """A `tokenizers.Tokenizer` from tokenizer.json, from a Qwen vocab.json (+ merges.txt), or from a folder of them."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        found = _tokenizer_file_in(p, kind)
        if found is None:
            raise TokenizerNotFound(f"{p}: no {kind} tokenizer.json here; run `rdbt download` to fetch the tokenizers")
        p = found
    if not p.is_file():
        raise TokenizerNotFound(f"{p}: tokenizer file not found; run `rdbt download` to fetch the tokenizers")
    try:
        if p.name == "vocab.json":
            return _qwen_from_vocab_merges(p)
        return Tokenizer.from_file(str(p))
    except TokenizerNotFound:
        raise
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        raise TokenizerNotFound(
            f"{p}: not a readable tokenizer ({exc}); run `rdbt download` to fetch it again"
        ) from None


def _special_id(tok, token: str, path) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise TokenizerNotFound(f"{path}: tokenizer has no {token!r} token; is it the right tokenizer (Qwen / T5)?")
    return i


def qwen_mask(ids: list[int], pad_id: int) -> list[int]:
    """ComfyUI's attention mask for a pad-only-special tokenizer (sd1_clip.SDClipModel.process_tokens, end = None)."""
    mask, ended, leading = [], False, True
    for i in ids:
        if ended or (leading and i == pad_id):
            mask.append(0)
            continue
        leading = False
        if i == pad_id:
            ended = True
            mask.append(0)
        else:
            mask.append(1)
    return mask


class PromptTokenizer:
    """Both Anima tokenizers with ComfyUI's segment-wise rules (AnimaTokenizer.tokenize_with_weights)."""

    def __init__(self, qwen, t5, *, legacy_embedding_split: bool = False, qwen_path=None, t5_path=None):
        self.qwen, self.t5 = qwen, t5
        self.legacy_embedding_split = legacy_embedding_split
        self.qwen_pad_id = _special_id(qwen, QWEN_PAD, qwen_path or "qwen tokenizer")
        self.t5_eos_id = _special_id(t5, T5_EOS, t5_path or "t5 tokenizer")

    @classmethod
    def from_files(cls, qwen_path: str | Path, t5_path: str | Path, **kwargs) -> PromptTokenizer:
        return cls(
            load_tokenizer(qwen_path, "qwen"), load_tokenizer(t5_path, "t5"), qwen_path=qwen_path, t5_path=t5_path,
            **kwargs,
        )

    def tokenize(self, prompt: str) -> TokenizedPrompt:
        qwen_ids: list[int] = []
        t5_ids: list[int] = []
        t5_weights: list[float] = []
        for piece, weight in parse_weights(prompt, legacy_embedding_split=self.legacy_embedding_split):
            qwen_ids += self.qwen.encode(piece, add_special_tokens=False).ids
            # Without the post-processor's </s>: ComfyUI drops each piece's last id (that </s>), appends one at the end.
            ids = self.t5.encode(piece, add_special_tokens=False).ids
            t5_ids += ids
            t5_weights += [weight] * len(ids)
        if not qwen_ids:  # min_length 1, padded with <|endoftext|>
            qwen_ids = [self.qwen_pad_id]
        t5_ids.append(self.t5_eos_id)
        t5_weights.append(1.0)
        return TokenizedPrompt(qwen_ids, t5_ids, t5_weights, qwen_mask(qwen_ids, self.qwen_pad_id))


# ---------------------------------------------------------------------------------------------------------------------
# Finding the tokenizer files
# ---------------------------------------------------------------------------------------------------------------------

# Folder names: rdbt's own layout, then ComfyUI's bundled folders (comfy/text_encoders/).
_FOLDERS = {"qwen": ("qwen", "qwen25_tokenizer", "qwen3_tokenizer"), "t5": ("t5", "t5_tokenizer")}
# Upstream repos whose files may already be in the Hugging Face cache (formats.md §5); looked up offline only.
HF_SOURCES = {
    "qwen": (("Qwen/Qwen3-0.6B-Base", "tokenizer.json"), ("Qwen/Qwen3-0.6B", "tokenizer.json")),
    "t5": (("google/t5-v1_1-xxl", "tokenizer.json"), ("google-t5/t5-base", "tokenizer.json")),
}


def _tokenizer_file_in(folder: Path, kind: str) -> Path | None:
    for name in ("tokenizer.json",) + (("vocab.json",) if kind == "qwen" else ()):
        if (folder / name).is_file():
            return folder / name
    return None


def _comfy_roots(models_dirs) -> list[Path]:
    roots = []
    spec = importlib.util.find_spec("comfy")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    for d in models_dirs:
        roots.append(Path(d).resolve().parent / "comfy")  # <ComfyUI>/models -> <ComfyUI>/comfy
    return roots


def _candidates(kind: str, text_encoder, models_dirs) -> list[Path]:
    folders = []
    if text_encoder is not None:
        te_dir = Path(text_encoder).parent
        for base in (te_dir, te_dir / "tokenizers"):
            folders += [base / name for name in _FOLDERS[kind]]
    folders += [Path(d) / "tokenizers" / kind for d in models_dirs]
    folders += [root / "text_encoders" / name for root in _comfy_roots(models_dirs) for name in _FOLDERS[kind][1:2]]
    folders.append(user_dir() / "tokenizers" / kind)
    return folders


def _from_hf_cache(kind: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo, filename in HF_SOURCES[kind]:
        try:
            hit = try_to_load_from_cache(repo, filename)
        except Exception:  # a malformed cache is the same as no cache here
            continue
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def _find_one(kind: str, explicit, text_encoder, models_dirs) -> Path:
    if explicit is not None:
        p = Path(explicit)
        found = _tokenizer_file_in(p, kind) if p.is_dir() else (p if p.is_file() else None)
        if found is None:
            wanted = "tokenizer.json or vocab.json + merges.txt" if kind == "qwen" else "tokenizer.json"
            raise TokenizerNotFound(
                f"{p}: no {kind} tokenizer there (expected {wanted}); "
                "fix the path or run `rdbt download` to fetch the tokenizers"
            )
        return found
    looked = _candidates(kind, text_encoder, models_dirs)
    for folder in looked:
        found = _tokenizer_file_in(folder, kind)
        if found is not None:
            return found
    hit = _from_hf_cache(kind)
    if hit is not None:
        return hit
    hf = ", ".join(repo for repo, _ in HF_SOURCES[kind])
    where = ", ".join(str(f) for f in looked) + f", the Hugging Face cache ({hf})"
    raise TokenizerNotFound(
        f"no {kind} tokenizer found (looked in {where}); run `rdbt download` to fetch the tokenizers, "
        f"or put tokenizer.json in <models>/tokenizers/{kind}/"
    )


def find_tokenizers(qwen=None, t5=None, text_encoder=None, models_dirs=()) -> tuple[Path, Path]:
    """(Qwen, T5) tokenizer files: explicit paths, next to the TE file, <models>/tokenizers/{qwen,t5}/, an installed
    ComfyUI's bundled folders, rdbt's user folder, then the Hugging Face cache (offline); else TokenizerNotFound."""
    models_dirs = [Path(d) for d in models_dirs]
    return _find_one("qwen", qwen, text_encoder, models_dirs), _find_one("t5", t5, text_encoder, models_dirs)
