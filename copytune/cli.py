"""The ``copytune`` command line. Commands are thin: they call the library and print; errors exit 1 in one line."""

from __future__ import annotations

import click
import torch

import copytune


@click.group()
@click.version_option(copytune.__version__, prog_name="copytune")
def main() -> None:
    """Autotuned dispatch of batched small GPU copies."""


@main.command()
@click.option("--device", default=None, help="Device to report on (default: cuda if present, else cpu).")
def info(device: str | None) -> None:
    """Show the device, library versions and every strategy's availability (with the reason when not).

    Example: copytune info --device cuda:1
    """
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    click.echo(f"device   {dev} ({name})")
    click.echo(f"torch    {torch.__version__} (CUDA {torch.version.cuda or '-'})")
    click.echo(f"triton   {_triton_version()}")
    click.echo(f"copytune {copytune.__version__}")
    click.echo("strategies:")
    for strategy_name, strategy in copytune.strategies().items():
        reason = strategy.available(dev)
        click.echo(f"  {strategy_name:<18} {'available' if reason is None else 'unavailable: ' + reason}")


def _triton_version() -> str:
    try:
        import triton  # noqa: PLC0415
    except ImportError:
        return "not installed"
    return triton.__version__
