"""`siftc` command line: a thin layer over the library. Commands load lazily, so an error in one
command's imports cannot break the others."""
import importlib
import sys

import click

from siftc.errors import SiftcError

# name -> "module:function". The CLI's command list comes from here.
COMMANDS = {
    "convert": "siftc.cli.convert:convert",
    "inspect": "siftc.cli.inspect:inspect_cmd",
    "export": "siftc.cli.export:export_cmd",
    "bench": "siftc.cli.bench:bench_cmd",
    "train": "siftc.cli.train:train",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SiftcError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"siftc: error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="siftc")
@click.pass_context
def main(ctx, debug):
    """siftc: Sparse Iso-FLOP Transformations for PyTorch models.

    \b
    siftc convert examples/resnet18_cifar.py --kind parallel --sparsity 0.9 -o rn18-par90/
    siftc inspect rn18-par90/
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


if __name__ == "__main__":
    sys.exit(main())
