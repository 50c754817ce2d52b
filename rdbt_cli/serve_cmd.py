"""The `rdbt serve` command: its options, and --status / --stop. The server itself is server.py; cli.py registers
this command, which lives here to keep cli.py a thin list of commands."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from rdbt_cli import completion, settings
from rdbt_cli.config import LoadParams
from rdbt_cli.errors import ConfigError
from rdbt_cli.options import flag, loading

SERVE = "Server"


@loading
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; other than 127.0.0.1 needs --api-key or --insecure.", rich_help_panel=SERVE)] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (7860, as A1111; 0 picks a free one).", rich_help_panel=SERVE)] = 7860,
    preset: Annotated[Optional[str], typer.Option(help="Preset under every request (its model is loaded).", rich_help_panel=settings.GEN_PANEL, metavar="NAME|PATH", autocompletion=completion.presets)] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="RDBT_API_KEY", help="Key every request must carry (Authorization: Bearer KEY, or HTTP Basic with KEY as password); better set as $RDBT_API_KEY, since other users can read a command's arguments. gen and batch read it from RDBT_HOME/server.json (yours only).", rich_help_panel=SERVE)] = None,
    insecure: Annotated[bool, flag("--insecure", help="Listen on another address without an API key.", rich_help_panel=SERVE)] = False,
    queue: Annotated[int, typer.Option(min=1, max=1000, help="Requests that may wait; more are answered 503.", rich_help_panel=SERVE)] = 16,
    status: Annotated[bool, flag("--status", help="Show the server running for this RDBT_HOME and exit.", rich_help_panel=SERVE)] = False,
    stop: Annotated[bool, flag("--stop", help="Stop the server running for this RDBT_HOME (it cancels its current job).", rich_help_panel=SERVE)] = False,
    load: LoadParams = None,
):
    """Keep the models loaded and answer HTTP: A1111's web API (/sdapi/v1, for webuiapi, Open WebUI, SillyTavern, ...)
    and rdbt's own (/rdbt/v1), which `rdbt gen` and `rdbt batch` use by themselves while it runs.

    Example: rdbt serve --preset rdbt &  then  rdbt gen "1girl, night sky"  (no model loading)
    """
    from rdbt_cli import client

    if status or stop:
        typer.echo(client.stop() if stop else client.describe())
        return
    try:
        from rdbt_cli import server
    except ImportError as e:
        raise ConfigError(f"rdbt serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'rdbt[serve]'") \
            from None
    server.serve(load, host=host, port=port, preset=preset, api_key=api_key, insecure=insecure,
                 limits=server.Limits(queue=queue))
