from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip with the reason when it is absent (a user's fresh clone has no ../shared)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data {p} is not present (only CI and developers have ../shared)")
    return p


@pytest.fixture(autouse=True)
def _isolated_user_state(tmp_path_factory, monkeypatch):
    # One env var relocates all user state (presets, LoRA stack, caches), so tests never touch the real home.
    home = tmp_path_factory.mktemp("rdbt_home")
    monkeypatch.setenv("RDBT_HOME", str(home))
    monkeypatch.delenv("RDBT_MODELS", raising=False)
    yield
