import importlib.util
import json
import math
import shutil
import unicodedata

import numpy as np
import pytest

from conftest import shared_path
from rdbt_cli.config import TINY_ADAPTER, TINY_QWEN
from rdbt_cli.errors import TokenizerNotFound
from rdbt_cli.text import PromptTokenizer, find_tokenizers, parse_weights, qwen_mask
from rdbt_cli.tiny import build_tiny_tokenizers

# ---------------------------------------------------------------------------------------------------------------------
# Weight syntax
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("plain prompt, no weights", [("plain prompt, no weights", 1.0)]),
        ("", []),
        ("(cat)", [("cat", 1.1)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("(cat:1.3)", [("cat", 1.3)]),
        ("((cat):1.5)", [("cat", 1.5 * 1.1)]),  # the inner group still multiplies
        ("((cat:1.5))", [("cat", 1.5)]),  # an explicit weight replaces the outer 1.1
        ("a ((b (c:3) d:2)) e", [("a ", 1.0), ("b ", 2.0), ("c", 3.0), (" d", 2.0), (" e", 1.0)]),
        ("(a)(b)", [("a", 1.1), ("b", 1.1)]),
        ("(x: 1.5 )", [("x", 1.5)]),  # Python float() accepts surrounding spaces, as in ComfyUI
        ("(x:1e1)", [("x", 10.0)]),
        (r"\(x\) (y)", [("(x) ", 1.0), ("y", 1.1)]),
        (r"hatsune miku \(vocaloid\)", [("hatsune miku (vocaloid)", 1.0)]),
        ("@some_artist_(name)", [("@some_artist_", 1.0), ("name", 1.1)]),
        # malformed input never raises and keeps ComfyUI's reading
        ("(unclosed", [("(unclosed", 1.0)]),
        ("stray) here", [("stray) here", 1.0)]),
        ("a) (b)", [("a) (b)", 1.0)]),  # the stray ")" leaves depth -1, so "(b)" is never a group
        ("((a) b", [("((a) b", 1.0)]),
        ("(x:abc)", [("x:abc", 1.1)]),
        ("(x:)", [("x:", 1.1)]),
        ("(:1.5)", [(":1.5", 1.1)]),  # a colon at position 0 is not a weight
        ("()", []),
        ("(x:1.2:1.4)", [("x:1.2", 1.4)]),  # the last colon holds the weight
        ("back\\slash \\", [("back\\slash \\", 1.0)]),
    ],
)
def test_parse_weights(prompt, expected):
    got = parse_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == [w for _, w in expected]


def test_nan_weight_parses_like_python():
    ((text, w),) = parse_weights("(x:nan)")
    assert text == "x" and math.isnan(w)


@pytest.mark.parametrize(
    "prompt, current, legacy",
    [
        ("x embedding:foo", [("x ", 1.0), ("embedding:foo", 1.0)], [("x", 1.0), ("embedding:foo", 1.0)]),
        ("a\nembedding:b c", [("a\n", 1.0), ("embedding:b c", 1.0)], [("a", 1.0), ("embedding:b c", 1.0)]),
        ("a\tembedding:b", [("a\t", 1.0), ("embedding:b", 1.0)], [("a\tembedding:b", 1.0)]),
        ("embedding:foo bar", [("embedding:foo bar", 1.0)], [("embedding:foo bar", 1.0)]),
        ("xembedding:foo", [("xembedding:foo", 1.0)], [("xembedding:foo", 1.0)]),
        ("(a embedding:b:1.2)", [("a ", 1.2), ("embedding:b", 1.2)], [("a", 1.2), ("embedding:b", 1.2)]),
    ],
)
def test_embedding_split(prompt, current, legacy):
    assert parse_weights(prompt) == current
    assert parse_weights(prompt, legacy_embedding_split=True) == legacy


def test_qwen_mask_rule():
    assert qwen_mask([9], 9) == [0]
    assert qwen_mask([1, 2, 3], 9) == [1, 1, 1]
    assert qwen_mask([9, 9, 5, 6, 9, 7, 9], 9) == [0, 0, 1, 1, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Real tokenizers: the spec's vectors and ComfyUI's recorded ids
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[("tokenizers",), ("golden", "models", "tokenizers")], ids=["shared", "golden"])
def real(request):
    base = shared_path(*request.param)
    return PromptTokenizer.from_files(base / "qwen", base / "t5")


def test_spec_vectors(real):
    t = real.tokenize("")
    assert (t.qwen_ids, t.t5_ids, t.t5_weights, t.qwen_mask) == ([151643], [1], [1.0], [0])
    t = real.tokenize("1girl, solo, masterpiece")
    assert t.qwen_ids == [16, 28552, 11, 13529, 11, 58731]
    assert t.t5_ids == [209, 18722, 6, 6729, 6, 20975, 1]
    assert t.qwen_mask == [1] * 6
    t = real.tokenize("worst quality, low quality, score_1, score_2, score_3, blurry, jpeg artifacts, sepia")
    assert t.qwen_ids == [49710, 267, 4271, 11, 3347, 4271, 11, 5456, 62, 16, 11, 5456, 62, 17, 11, 5456, 62, 18, 11,
                          99055, 11, 54566, 35036, 11, 21017, 685]
    assert t.t5_ids == [6025, 463, 6, 731, 463, 6, 2604, 834, 4347, 2604, 834, 4482, 2604, 834, 6355, 16810, 651, 6, 3,
                        354, 855, 122, 768, 23, 8717, 7, 6, 142, 102, 23, 9, 1]
    t = real.tokenize("(masterpiece:1.2), 1girl")
    assert t.qwen_ids == [13629, 22362, 11, 220, 16, 28552]
    assert t.t5_ids == [20975, 3, 6, 209, 18722, 1]
    assert t.t5_weights == [1.2, 1.0, 1.0, 1.0, 1.0, 1.0]
    t = real.tokenize(r"oil painting \(medium\), ((smile))")
    assert t.t5_ids == [1043, 3924, 41, 5700, 440, 201, 3993, 1]
    assert t.t5_weights == [1.0] * 6 + [1.1 * 1.1, 1.0]


def test_segments_change_ids(real):
    # Whole-string tokenization of the weighted prompt would give other ids (spec §3.7).
    whole = real.t5.encode("(masterpiece:1.2), 1girl").ids
    assert whole == [41, 7429, 8424, 10, 10917, 201, 209, 18722, 1]
    assert real.tokenize("(masterpiece:1.2), 1girl").t5_ids != whole


def _records():
    path = shared_path("golden", "tokenizers_expected.json")
    return json.loads(path.read_text(encoding="utf-8"))["records"]


def _check_record(tok, rec, legacy):
    t = tok.tokenize(rec["text"])
    assert t.qwen_ids == rec["qwen_ids"], rec["text"]
    assert t.t5_ids == rec["t5_ids"], rec["text"]
    # ComfyUI hands the weights over as a float32 tensor
    assert np.array_equal(np.asarray(t.t5_weights, np.float32), np.asarray(rec["t5_weights"], np.float32))
    segments = parse_weights(rec["text"], legacy_embedding_split=legacy)
    assert [list(s) for s in segments] == rec["segments"]


def test_every_recorded_prompt(real):
    records = _records()
    assert len(records) == 15
    for rec in records:
        if "embedding:" in rec["text"]:
            continue
        _check_record(real, rec, legacy=False)


def test_recorded_embedding_prompt(real):
    # The goldens' ComfyUI dropped the space before "embedding:"; current ComfyUI (the spec) keeps it.
    (rec,) = [r for r in _records() if "embedding:" in r["text"]]
    legacy = PromptTokenizer(real.qwen, real.t5, legacy_embedding_split=True)
    _check_record(legacy, rec, legacy=True)
    now = real.tokenize(rec["text"])
    assert now.t5_ids == rec["t5_ids"]  # T5's normaliser strips the trailing space anyway
    i = rec["qwen_ids"].index(448)  # " with"
    assert now.qwen_ids == rec["qwen_ids"][: i + 1] + [220] + rec["qwen_ids"][i + 1 :]


def test_japanese_and_artist_tags(real):
    t = real.tokenize("東京の夜景、ネオンが輝く雨の街角。")
    assert t.qwen_ids[:4] == [102356, 46553, 15767, 99530] and len(t.qwen_ids) == 16
    assert t.t5_ids == [3, 2, 1]  # T5 has no CJK pieces: "▁" then <unk>
    t = real.tokenize("@digital art, 1girl, looking at viewer")
    assert t.qwen_ids[:3] == [31, 57269, 1947] and t.t5_ids[:3] == [3320, 9206, 138]


@pytest.mark.parametrize("prompt", [" ", "   ", "\n", " \t \n "])
def test_whitespace_only(real, prompt):
    t = real.tokenize(prompt)
    assert t.t5_ids == [1] and t.t5_weights == [1.0]
    assert t.qwen_ids and 151643 not in t.qwen_ids and t.qwen_mask == [1] * len(t.qwen_ids)


def test_special_token_text_is_masked_after_endoftext(real):
    t = real.tokenize("<|im_start|>user hello<|im_end|> <|endoftext|>")
    assert t.qwen_ids == [151644, 872, 23811, 151645, 220, 151643]
    assert t.qwen_mask == [1, 1, 1, 1, 1, 0]


def test_vocab_and_merges_pair(tmp_path):
    # ComfyUI's qwen25_tokenizer folder has vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json.
    src = json.loads(shared_path("tokenizers", "qwen", "tokenizer.json").read_text(encoding="utf-8"))
    folder = tmp_path / "qwen25_tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(src["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in src["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    decoder = {str(a["id"]): {"content": a["content"], "special": a["special"]} for a in src["added_tokens"]}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}), encoding="utf-8")
    tok = PromptTokenizer.from_files(folder, shared_path("tokenizers", "t5"))
    for rec in _records():
        if "embedding:" not in rec["text"]:
            assert tok.tokenize(rec["text"]).qwen_ids == rec["qwen_ids"], rec["text"]


# ---------------------------------------------------------------------------------------------------------------------
# Tiny tokenizers
# ---------------------------------------------------------------------------------------------------------------------

UNICODE = (
    "猫耳の少女 🐱✨👩‍👩‍👧 ｆｕｌｌ ＡＢＣ café naïve e\u0301 "  # emoji ZWJ sequence, full-width, combining accent
    "עברית العربية \x00\x07\t\n\u200b\U0010fffd end"  # RTL scripts, control chars, zero-width, private use
)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return build_tiny_tokenizers(tmp_path_factory.mktemp("tiny_tok"))


def test_tiny_tokenizers_deterministic(tmp_path, tiny_files):
    again = build_tiny_tokenizers(tmp_path)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in tiny_files]
    assert [p.relative_to(tmp_path).as_posix() for p in again] == ["qwen/tokenizer.json", "t5/tokenizer.json"]


def test_tiny_tokenizers_fit_and_encode_any_unicode(tiny_files):
    tok = PromptTokenizer.from_files(*tiny_files)
    assert tok.qwen.get_vocab_size() <= TINY_QWEN.vocab_size
    assert tok.t5.get_vocab_size() <= TINY_ADAPTER.vocab_size
    assert tok.qwen_pad_id != 151643  # the tiny vocabulary has its own ids
    t = tok.tokenize(f"(masterpiece:1.2), {UNICODE}, embedding:x")
    assert max(t.qwen_ids) < TINY_QWEN.vocab_size and max(t.t5_ids) < TINY_ADAPTER.vocab_size
    assert 2 not in t.t5_ids  # byte fallback: nothing is <unk>
    ids = tok.qwen.encode(UNICODE, add_special_tokens=False).ids
    assert tok.qwen.decode(ids) == unicodedata.normalize("NFC", UNICODE)  # Qwen normalises to NFC first
    assert t.t5_weights[0] == 1.2 and t.t5_ids[-1] == tok.t5_eos_id
    empty = tok.tokenize("")
    assert empty.qwen_ids == [tok.qwen_pad_id] and empty.t5_ids == [tok.t5_eos_id]


# ---------------------------------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------------------------------


def _place(tiny_files, folder):
    for src, kind in zip(tiny_files, ("qwen", "t5")):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / kind / "tokenizer.json")
    return folder / "qwen" / "tokenizer.json", folder / "t5" / "tokenizer.json"


@pytest.fixture
def no_hf_cache(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: None)
    if importlib.util.find_spec("comfy") is not None:
        pytest.skip("an installed ComfyUI would be found first")


def test_discovery_order(tmp_path, tiny_files, no_hf_cache):
    models = tmp_path / "models"
    te = models / "text_encoders" / "qwen_3_06b_base.safetensors"
    te.parent.mkdir(parents=True)
    in_models = _place(tiny_files, models / "tokenizers")
    beside_te = _place(tiny_files, te.parent / "tokenizers")
    explicit = _place(tiny_files, tmp_path / "mine")
    assert find_tokenizers(explicit[0], explicit[1].parent, te, [models]) == explicit
    assert find_tokenizers(text_encoder=te, models_dirs=[models]) == beside_te
    assert find_tokenizers(models_dirs=[models]) == in_models
    assert find_tokenizers(text_encoder=tmp_path / "elsewhere" / "te.safetensors", models_dirs=[models]) == in_models


def test_discovery_comfyui_bundle_and_user_dir(tmp_path, tiny_files, no_hf_cache):
    from rdbt_cli.config import user_dir

    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    bundle = comfy / "comfy" / "text_encoders"
    src = json.loads(tiny_files[0].read_text(encoding="utf-8"))
    (bundle / "qwen25_tokenizer").mkdir(parents=True)
    (bundle / "qwen25_tokenizer" / "vocab.json").write_text(json.dumps(src["model"]["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in src["model"]["merges"]]
    (bundle / "qwen25_tokenizer" / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    (bundle / "t5_tokenizer").mkdir()
    shutil.copy(tiny_files[1], bundle / "t5_tokenizer" / "tokenizer.json")
    q, t = find_tokenizers(models_dirs=[comfy / "models"])
    assert (q, t) == (bundle / "qwen25_tokenizer" / "vocab.json", bundle / "t5_tokenizer" / "tokenizer.json")
    # vocab.json without a config: <|endoftext|> follows the vocabulary, and ids match the tokenizer.json they came from
    tok = PromptTokenizer.from_files(q, t)
    ref = PromptTokenizer.from_files(*tiny_files)
    assert tok.tokenize(UNICODE).qwen_ids == ref.tokenize(UNICODE).qwen_ids
    assert tok.tokenize("").qwen_ids == ref.tokenize("").qwen_ids
    # with nothing in any models folder, rdbt's own user folder is used
    mine = _place(tiny_files, user_dir() / "tokenizers")
    assert find_tokenizers(models_dirs=[tmp_path / "empty"]) == mine


def test_discovery_hf_cache(tmp_path, tiny_files, monkeypatch):
    import huggingface_hub

    if importlib.util.find_spec("comfy") is not None:
        pytest.skip("an installed ComfyUI would be found first")
    cached = {"Qwen/Qwen3-0.6B-Base": str(tiny_files[0]), "google-t5/t5-base": str(tiny_files[1])}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: cached.get(repo))
    assert find_tokenizers(models_dirs=[tmp_path]) == tiny_files


def test_not_found_is_one_readable_line(tmp_path, no_hf_cache):
    with pytest.raises(TokenizerNotFound) as err:
        find_tokenizers(models_dirs=[tmp_path / "models"])
    msg = str(err.value)
    assert "\n" not in msg and "rdbt download" in msg
    assert str(tmp_path / "models" / "tokenizers" / "qwen") in msg and "Hugging Face cache" in msg
    with pytest.raises(TokenizerNotFound, match="nope.json.*rdbt download"):
        find_tokenizers(qwen=tmp_path / "nope.json")


def test_broken_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerNotFound, match="not a readable tokenizer"):
        PromptTokenizer.from_files(bad, bad)
