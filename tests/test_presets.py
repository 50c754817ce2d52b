import re
import sys
from pathlib import Path

import pytest

from rdbt_cli import presets
from rdbt_cli.config import SAMPLER_NAMES, SCHEDULER_NAMES, LoraSpec, user_dir
from rdbt_cli.settings import DEFAULTS, GenParams, parse_size, resolve
from rdbt_cli.errors import ConfigError
from rdbt_cli.presets import (
    PRESET_KEYS, Preset, list_presets, load_preset, resolve_model,
)

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("rdbt", "rdbt-cfg", "anima-base", "kirazuri", "kirazuri-fast", "turbo")


def write_user_preset(name: str, text: str) -> Path:
    folder = user_dir() / "presets"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(text: str, name: str = "p") -> str:
    path = write_user_preset(name, text)
    with pytest.raises(ConfigError) as info:
        load_preset(name)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:"), msg
    return msg


def line_in(msg: str) -> int:
    return int(re.match(r".*?\.toml:(\d+): ", msg).group(1))


# --- bundled presets -------------------------------------------------------------------------------------------------


def test_bundled_presets_all_load_and_validate():
    infos = {i.name: i for i in list_presets()}
    assert set(REQUIRED) <= set(infos)
    for path in sorted((REPO / "presets").glob("*.toml")):
        info = infos[path.stem]
        assert info.source == "builtin" and info.path.resolve() == path.resolve()
        assert info.description
        p = load_preset(path.stem)
        assert isinstance(p, Preset) and p.name == path.stem
        assert p.sampler in SAMPLER_NAMES and p.scheduler in SCHEDULER_NAMES
        assert p.steps >= 1 and p.cfg >= 0 and p.shift > 0
        assert p.width % 16 == 0 and p.height % 16 == 0
        # Presets never pin device or dtype; a comment header says where the values come from.
        assert path.read_text(encoding="utf-8").lstrip().startswith("#")


def test_bundled_values_follow_the_spec():
    rdbt, rdbt_cfg, base = load_preset("rdbt"), load_preset("rdbt-cfg"), load_preset("anima-base")
    kira, fast, turbo = load_preset("kirazuri"), load_preset("kirazuri-fast"), load_preset("turbo")
    assert (rdbt.sampler, rdbt.cfg) == ("er_sde", 1.0) and 16 <= rdbt.steps <= 24
    assert rdbt_cfg.cfg == 4.0
    assert (base.sampler, base.steps, base.cfg, base.scheduler) == ("er_sde", 30, 4.0, "simple")
    assert kira.sampler == "er_sde" and 30 <= kira.steps <= 50 and 4 <= kira.cfg <= 5
    assert max(kira.width, kira.height) >= 1280
    assert fast.sampler == "sa_solver_pece" and 15 <= fast.steps <= 20
    assert turbo.cfg == 1.0 and 8 <= turbo.steps <= 12
    assert [(lo.weight) for lo in turbo.loras] == [0.3] and "turbo" in turbo.loras[0].name


def test_packaging_maps_presets_into_the_wheel():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]["presets"] == "rdbt_cli/presets"
    assert presets.builtin_dir().resolve() in {(REPO / "presets").resolve(), (REPO / "rdbt_cli/presets").resolve()}


# --- user presets ----------------------------------------------------------------------------------------------------


def test_user_preset_overrides_builtin_and_is_listed():
    path = write_user_preset("turbo", 'description = "mine"\nsteps = 9\n')
    write_user_preset("zz-mine", "cfg = 2\n")
    infos = {i.name: i for i in list_presets()}
    assert infos["turbo"].source == "user" and infos["turbo"].path == path and infos["turbo"].description == "mine"
    assert infos["zz-mine"].source == "user" and infos["zz-mine"].description is None
    assert infos["rdbt"].source == "builtin"
    assert [i.name for i in list_presets()] == sorted(infos)
    p = load_preset("turbo")
    assert p.steps == 9 and p.loras == [] and p.cfg is None
    assert load_preset("zz-mine").cfg == 2.0 and isinstance(load_preset("zz-mine").cfg, float)


def test_invalid_user_presets_are_listed_with_their_problem():
    write_user_preset("bad-value", 'steps = "many"\n')
    write_user_preset("bad-toml", "steps = \n")
    write_user_preset("good", 'description = "fine"\nsteps = 9\n')
    infos = {i.name: i for i in list_presets()}
    for name, words in (("bad-value", "whole number"), ("bad-toml", "not valid TOML")):
        info = infos[name]
        assert info.description is None and f"{name}.toml:1:" in info.error and words in info.error
        with pytest.raises(ConfigError) as err:  # the same words `--preset` says
            load_preset(name)
        assert str(err.value) == info.error
    assert infos["good"].error is None and infos["good"].description == "fine"


def test_bundled_preset_comments_cite_only_what_the_repository_has():
    for path in sorted((REPO / "presets").glob("*.toml")):
        comments = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("#"))
        for cited in re.findall(r"[\w./-]+\.(?:md|py|json|toml)\b", comments):
            assert (REPO / cited).exists(), f"{path.name} cites {cited}, which the repository does not have"
        assert "spec/" not in comments and "§" not in comments, path.name


def test_load_by_path_with_model_and_loras(tmp_path, monkeypatch):
    path = tmp_path / "mine.toml"
    path.write_text(
        'model = "kirazuri_v1"\nsize = "832x1216"\nnegative = "bad"\n\n'
        '[[lora]]\nname = "a"\nweight = 0.5\n\n[[lora]]\nname = "C:\\\\loras\\\\b.safetensors"\n',
        encoding="utf-8",
    )
    p = load_preset(str(path))
    assert (p.name, p.model, p.width, p.height, p.negative) == ("mine", "kirazuri_v1", 832, 1216, "bad")
    assert p.loras == [LoraSpec("a", 0.5), LoraSpec("C:\\loras\\b.safetensors", 1.0)]
    with pytest.raises(ConfigError, match="preset file not found"):
        load_preset(str(tmp_path / "missing.toml"))
    # A bare NAME.toml that is no file in the current folder is the preset NAME.
    monkeypatch.chdir(tmp_path)
    assert load_preset("turbo.toml").name == "turbo" and load_preset("mine.toml").model == "kirazuri_v1"


def test_unknown_preset_lists_available():
    write_user_preset("mine", "steps = 3\n")
    with pytest.raises(ConfigError) as info:
        load_preset("nope")
    msg = str(info.value)
    assert '"nope"' in msg
    for name in (*REQUIRED, "mine"):
        assert name in msg


# --- validation errors: file, line and the valid choices -------------------------------------------------------------


def test_unknown_key_names_line_and_valid_keys():
    msg = error_of('steps = 20\n# a comment\n\nsampeler = "euler"\n')
    assert line_in(msg) == 4 and '"sampeler"' in msg
    for key in PRESET_KEYS:
        assert key in msg


@pytest.mark.parametrize(
    "text, line, needles",
    [
        ('steps = 20\nsampler = "eulr"\n', 2, SAMPLER_NAMES),
        ('\n\nscheduler = "karas"\n', 3, SCHEDULER_NAMES),
        ("cfg = 4\nsteps = 0\n", 2, ("at least 1",)),
        ('steps = "20"\n', 1, ("whole number",)),
        ("steps = 20.5\n", 1, ("whole number",)),
        ("cfg = -1\n", 1, ("0 or more",)),
        ('cfg = "4"\n', 1, ("number",)),
        ("shift = 0\n", 1, ("greater than 0",)),
        ('size = "1000x1024"\n', 1, ("multiple of 16",)),
        ('steps = 3\nsize = "big"\n', 2, ("WIDTHxHEIGHT",)),
        ("size = 1024\n", 1, ("832x1216",)),
        ("width = 1030\n", 1, ("multiple of 16",)),
        ("height = 0\n", 1, ("multiple of 16",)),
        ("negative = 3\n", 1, ("string",)),
        ('size = "1024x1024"\nwidth = 1024\n', 2, ("not both",)),
        ('lora = "x"\n', 1, ("[[lora]]",)),
        ('steps = 2\n[[lora]]\nname = "a"\n\n[[lora]]\nname = "b"\nweigth = 1\n', 7, ("weigth", "name, weight")),
        ('[[lora]]\nname = "a"\nweight = "high"\n', 3, ("number",)),
        ('steps = 1\n\n[[lora]]\nweight = 1\n', 3, ("needs name",)),
        ('steps = 2\n\n[extra]\nx = 1\n', 3, ('"extra"', "valid keys")),
    ],
)
def test_bad_values_name_file_line_and_fix(text, line, needles):
    msg = error_of(text)
    assert line_in(msg) == line, msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize(
    "text, line", [("steps = 20\nsampler = \n", 2), ("steps = 20\ncfg = 4\nsteps = 3\n", 3), ('a = "open\n', 1),
                   ("[[lora]\nname = 1\n", 1)],
)
def test_malformed_toml_names_file_and_line(text, line):
    msg = error_of(text)
    assert line_in(msg) == line, msg
    assert "not valid TOML" in msg and "(at line" not in msg


# --- sizes -----------------------------------------------------------------------------------------------------------


def test_parse_size():
    assert parse_size("832x1216") == (832, 1216)
    assert parse_size(" 1024X768 ") == (1024, 768)
    for bad in ("832x1215", "0x1024", "1024", "axb", "-16x16", "1024x1024x2"):
        with pytest.raises(ConfigError, match=re.escape(bad.strip())):
            parse_size(bad)


# --- resolution ------------------------------------------------------------------------------------------------------


def test_precedence_defaults_preset_stack_flags():
    write_user_preset("p", 'steps = 12\ncfg = 1\nsampler = "euler"\n[[lora]]\nname = "a"\nweight = 0.5\n'
                           '[[lora]]\nname = "b"\nweight = 0.2\n')
    p = load_preset("p")
    stack = [LoraSpec("b", 0.7), LoraSpec("c", 1.0)]
    flags = GenParams(prompt="1girl", cfg=3.0, seed=5, loras=[LoraSpec("c", 0.4), LoraSpec("d", 1.5)])
    out = resolve(p, stack, flags)
    assert out.prompt == "1girl" and out.seed == 5
    assert out.steps == 12 and out.sampler == "euler"  # preset beats defaults
    assert out.cfg == 3.0  # flag beats preset
    assert (out.width, out.height, out.scheduler, out.shift, out.count) == (
        DEFAULTS.width, DEFAULTS.height, DEFAULTS.scheduler, DEFAULTS.shift, DEFAULTS.count)
    # First appearance keeps its place; the later layer's weight wins.
    assert out.loras == [LoraSpec("a", 0.5), LoraSpec("b", 0.7), LoraSpec("c", 0.4), LoraSpec("d", 1.5)]
    # The inputs are not mutated.
    assert p.cfg == 1.0 and stack == [LoraSpec("b", 0.7), LoraSpec("c", 1.0)]


def test_resolve_without_preset_and_lora_zero_removes():
    out = resolve(None, [LoraSpec("x", 1.0)], GenParams(loras=[LoraSpec("x", 0.0)]))
    assert out.loras == [] and out.steps == DEFAULTS.steps and out.sampler == DEFAULTS.sampler
    custom = GenParams(steps=7, cfg=2.0, loras=[LoraSpec("base", 1.0)])
    out = resolve(load_preset("turbo"), [], GenParams(), defaults=custom)
    assert out.steps == load_preset("turbo").steps and [s.name for s in out.loras] == ["base", "anima-turbo-lora-v0.2"]


def test_resolve_validates_flags():
    with pytest.raises(ConfigError, match="--sampler: unknown sampler 'nope'; valid samplers: er_sde"):
        resolve(None, [], GenParams(sampler="nope"))
    with pytest.raises(ConfigError, match="--width"):
        resolve(None, [], GenParams(width=1000))
    with pytest.raises(ConfigError, match="--steps"):
        resolve(None, [], GenParams(steps=0))


def test_resolve_model():
    p = Preset(model="from-preset")
    assert resolve_model(p, "flag") == "flag"
    assert resolve_model(p, None) == "from-preset"
    assert resolve_model(None, None) is None and resolve_model(Preset(), None) is None


def test_no_torch_import():
    import subprocess

    code = "import sys, rdbt_cli.presets, rdbt_cli.batch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
