import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", quick, re.S)


def test_quick_start_has_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "--model tiny" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()


def test_the_main_job_command_runs(tmp_path):
    import shlex
    import shutil
    import subprocess

    if shutil.which("rdbt") is None:
        import pytest

        pytest.skip("the rdbt entry point is not on PATH (package not installed)")
    main_job = _readme_commands()[0].split("&&", 1)[1].strip()  # the part after the install
    r = subprocess.run(shlex.split(main_job), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "out").glob("*.png"))


def test_a_cpu_only_torch_route_is_documented_with_sizes():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Installing torch", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    cpu = [line for block in blocks for line in block.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert cpu and cpu[0].startswith("python -m pip install torch --index-url")
    assert "GB" in section and "MiB" in section  # how big each route is
    # the quick start points there, and keeps its two commands
    assert "CPU build first" in text.split("## Quick start", 1)[1].split("\n## ", 1)[0]


def test_outputs_are_not_committed_by_accident():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "outputs/" in ignored or "/outputs/" in ignored  # where gen and batch write by default
