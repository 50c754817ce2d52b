"""rdbt: Anima text-to-image. The library's entry points, imported on first use so `import rdbt_cli` stays light:

    from rdbt_cli import LoadParams, plan, run      (see rdbt_cli.runner)
"""

__version__ = "0.1.0"

_EXPORTS = {"LoadParams": "config", "GenParams": "settings", "plan": "jobs", "Job": "jobs", "run": "runner",
            "Runner": "runner"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"rdbt_cli.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rdbt_cli' has no attribute {name!r}")
