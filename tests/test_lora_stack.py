import json

import pytest

from rdbt_cli import lora_stack
from rdbt_cli.config import LoraSpec, user_dir
from rdbt_cli.errors import LoraError


def test_empty_without_a_file():
    assert lora_stack.load_stack() == []
    assert not lora_stack.stack_path().exists()


def test_round_trip_and_edits():
    specs = [LoraSpec("turbo", 0.3), LoraSpec("style-ink", -0.5), LoraSpec("ünïcode name", 1.0)]
    path = lora_stack.save_stack(specs)
    assert path == user_dir() / "lora_stack.json"
    assert lora_stack.load_stack() == specs
    assert json.loads(path.read_text(encoding="utf-8"))["version"] == 1

    assert lora_stack.add(LoraSpec("detail", 0.8))[-1] == LoraSpec("detail", 0.8)
    # Adding a LoRA already stacked keeps its place and takes the new weight.
    assert lora_stack.add(LoraSpec("turbo", 0.6))[0] == LoraSpec("turbo", 0.6)
    assert [s.name for s in lora_stack.load_stack()] == ["turbo", "style-ink", "ünïcode name", "detail"]

    lora_stack.set_weight("style", 0.25)  # a unique prefix of a stacked name
    assert lora_stack.load_stack()[1] == LoraSpec("style-ink", 0.25)
    lora_stack.remove("detail")
    assert [s.name for s in lora_stack.load_stack()] == ["turbo", "style-ink", "ünïcode name"]
    assert lora_stack.clear() == [] and lora_stack.load_stack() == []
    # no temp files left behind (the lock file stays: deleting it would race with a waiting editor)
    assert sorted(p.name for p in path.parent.iterdir()) == [".lora_stack.json.lock", "lora_stack.json"]


def test_edit_errors_name_the_stack():
    lora_stack.save_stack([LoraSpec("style-ink", 1.0), LoraSpec("style-oil", 1.0)])
    with pytest.raises(LoraError, match="not in the stack.*style-ink, style-oil"):
        lora_stack.remove("turbo")
    with pytest.raises(LoraError, match="ambiguous in the stack: style-ink, style-oil"):
        lora_stack.set_weight("style", 0.5)
    with pytest.raises(LoraError, match="not a number"):
        lora_stack.set_weight("style-ink", "strong")
    with pytest.raises(LoraError, match="not a finite number"):
        lora_stack.add(LoraSpec("x", float("nan")))
    assert lora_stack.load_stack() == [LoraSpec("style-ink", 1.0), LoraSpec("style-oil", 1.0)]


def test_damaged_stack_file_says_how_to_fix_it():
    path = lora_stack.stack_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.raises(LoraError, match=r"lora_stack\.json: unreadable LoRA stack.*--clear"):
        lora_stack.load_stack()
    path.write_text(json.dumps({"loras": [{"weight": 1}]}))
    with pytest.raises(LoraError, match="entry 1 has no LoRA name"):
        lora_stack.load_stack()
    lora_stack.clear()
    assert lora_stack.load_stack() == []


def test_failed_save_keeps_the_old_stack(monkeypatch):
    lora_stack.save_stack([LoraSpec("keep", 1.0)])

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(lora_stack.os, "replace", boom)
        with pytest.raises(LoraError, match="cannot save the LoRA stack"):
            lora_stack.save_stack([LoraSpec("new", 1.0)])
    assert lora_stack.load_stack() == [LoraSpec("keep", 1.0)]
    assert [p.name for p in lora_stack.stack_path().parent.iterdir()] == ["lora_stack.json"]


def test_no_torch_import():
    # Other tests may have imported torch already, so check the module's own imports.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(lora_stack))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert "torch" not in imported and "safetensors" not in imported


# --- name resolution -------------------------------------------------------------------------------------------------


@pytest.fixture
def lora_dirs(tmp_path):
    a, b = tmp_path / "comfy" / "loras", tmp_path / "a1111" / "Lora"
    for d in (a, b, a / "styles"):
        d.mkdir(parents=True, exist_ok=True)
    for f in (a / "anima-turbo-lora-v0.2.safetensors", a / "Detail_Slider.safetensors",
              a / "styles" / "ink.safetensors", b / "ink-wash.safetensors", b / "old.pt", b / "notes.txt"):
        f.write_bytes(b"x")
    return [a, b, tmp_path / "absent"]


def test_resolve_exact_case_and_prefix(lora_dirs):
    a, b, _ = lora_dirs
    assert lora_stack.resolve_lora_name("anima-turbo-lora-v0.2", lora_dirs) == a / "anima-turbo-lora-v0.2.safetensors"
    assert lora_stack.resolve_lora_name("anima-turbo", lora_dirs) == a / "anima-turbo-lora-v0.2.safetensors"
    assert lora_stack.resolve_lora_name("detail_slider", lora_dirs) == a / "Detail_Slider.safetensors"
    assert lora_stack.resolve_lora_name("Detail_Slider.safetensors", lora_dirs) == a / "Detail_Slider.safetensors"
    # "ink" is exactly the stem of styles/ink, so the longer ink-wash does not make it ambiguous.
    assert lora_stack.resolve_lora_name("ink", lora_dirs) == a / "styles" / "ink.safetensors"
    assert lora_stack.resolve_lora_name("styles/ink", lora_dirs) == a / "styles" / "ink.safetensors"
    assert lora_stack.resolve_lora_name("ink-w", lora_dirs) == b / "ink-wash.safetensors"


def test_resolve_a_path(lora_dirs, tmp_path):
    f = tmp_path / "elsewhere.safetensors"
    f.write_bytes(b"x")
    assert lora_stack.resolve_lora_name(str(f), lora_dirs) == f
    with pytest.raises(LoraError, match="nowhere.safetensors: LoRA file not found; check the path"):
        lora_stack.resolve_lora_name(str(tmp_path / "nowhere.safetensors"), lora_dirs)


def test_resolve_ambiguous_and_missing(lora_dirs):
    a, b, _ = lora_dirs
    with pytest.raises(LoraError, match="'in' is ambiguous:.*ink.safetensors.*ink-wash.safetensors"):
        lora_stack.resolve_lora_name("in", lora_dirs)
    with pytest.raises(LoraError, match=f"'watercolor' not found in {a}, {b}"):
        lora_stack.resolve_lora_name("watercolor", lora_dirs)
    with pytest.raises(LoraError, match=r"old\.pt: pickle LoRAs"):
        lora_stack.resolve_lora_name("old", lora_dirs)


def test_a_stack_file_with_a_non_integer_version_is_a_clear_error():
    from rdbt_cli.errors import LoraError
    from rdbt_cli import lora_stack

    path = lora_stack.stack_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"version": "1", "loras": []}')
    with pytest.raises(LoraError, match="version"):
        lora_stack.load_stack()


def test_a_path_entry_is_edited_by_the_path_as_typed_its_file_name_or_stem(tmp_path, monkeypatch):
    (tmp_path / "l").mkdir()
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_blocks_0_mlp_layer1.lora_down.weight": torch.zeros(2, 4),  # add checks it is a LoRA
               "lora_unet_blocks_0_mlp_layer1.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "l" / "style.safetensors"))
    monkeypatch.chdir(tmp_path)
    stored = str(tmp_path / "l" / "style.safetensors")
    assert lora_stack.add(LoraSpec("l/style.safetensors", 0.7), []) == [LoraSpec(stored, 0.7)]
    for name, weight in (("l/style.safetensors", 0.3), ("style.safetensors", 0.4), ("style", 0.5), (stored, 0.6)):
        assert lora_stack.set_weight(name, weight) == [LoraSpec(stored, weight)]
    assert lora_stack.remove("style") == []


def test_a_weight_that_is_not_a_number_is_named_as_the_weight(tmp_path):
    with pytest.raises(LoraError, match="the weight 'abc' is not a number.*style:0.7"):
        lora_stack.resolve_lora_name("style:abc", [tmp_path])
    with pytest.raises(LoraError, match="not found"):  # no colon: a missing LoRA is still a missing LoRA
        lora_stack.resolve_lora_name("style", [tmp_path])
