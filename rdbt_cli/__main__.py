from rdbt_cli.cli import app

app(prog_name="rdbt")  # `python -m rdbt_cli` (and torchrun -m rdbt_cli) is the rdbt command: its usage, its completion
