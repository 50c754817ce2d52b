from rdbt_cli.cli import app

app()
