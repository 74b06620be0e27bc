"""`siftc` command line: a thin layer over the library. Commands load lazily, so an error in one
command's imports cannot break the others."""
import importlib
import sys
from contextlib import contextmanager

import click

from siftc.errors import SiftcError, internal_error

# `siftc` alone prints the help (click raises it as a usage error since 8.2)
_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())

# name -> "module:function". The CLI's command list comes from here.
COMMANDS = {
    "convert": "siftc.cli.convert:convert",
    "inspect": "siftc.cli.inspect:inspect_cmd",
    "export": "siftc.cli.export:export_cmd",
    "bench": "siftc.cli.bench:bench_cmd",
    "train": "siftc.cli.train:train",
    "densify": "siftc.cli.densify:densify_cmd",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def parse_args(self, ctx, args):
        with _one_line_errors(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with _one_line_errors(ctx):
            return super().invoke(ctx)


@contextmanager
def _one_line_errors(ctx):
    """A SiftcError, or a bad flag click catches (its usage block would be several lines), becomes
    `siftc: error: <one line>` and exit code 2. Any other exception is a bug in siftc: one line
    `siftc: internal error: ...` naming where it happened, and exit code 1. --debug shows them as raised."""
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort):
        raise  # click's own way out (ctx.exit, Ctrl-C), which are RuntimeErrors
    except (SiftcError, click.UsageError) as e:
        if (ctx.obj or {}).get("debug") or isinstance(e, _NoArgsIsHelp):
            raise
        message = " ".join(str(e if isinstance(e, SiftcError) else e.format_message()).split())
        if isinstance(e, click.UsageError):
            command = e.ctx.command_path if e.ctx else "siftc"
            message = f"{message.rstrip('.')}; see '{command} --help'"
        click.echo(f"siftc: error: {message}", err=True)
        ctx.exit(2)
    except click.ClickException:
        raise  # click prints these on one line itself
    except Exception as e:
        if (ctx.obj or {}).get("debug"):
            raise
        click.echo(f"siftc: internal error: {internal_error(e)}; rerun with --debug for the traceback and "
                   f"please report it", err=True)
        ctx.exit(1)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="siftc")
@click.pass_context
def main(ctx, debug):
    """siftc: Sparse Iso-FLOP Transformations for PyTorch models.

    \b
    siftc convert examples/resnet.py:resnet18_cifar --kind parallel --sparsity 0.9 -o rn18-par90/
    siftc inspect rn18-par90/
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


if __name__ == "__main__":
    sys.exit(main())
