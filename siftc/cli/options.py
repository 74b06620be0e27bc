"""What the commands' options share: defaults read from the library's config dataclasses, so `--help`
shows what a run really gets and cannot drift from it."""
from dataclasses import MISSING, fields


def defaults(cls) -> dict:
    """Field name -> default of the dataclass `cls`, for the fields that have a plain one.

    >>> defaults(ConvertConfig)["round_to"]
    1
    """
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def trust_source_option(f):
    """--trust-source: an artifact that needs its model file (a --leaf user module, format v2) may
    import and run it (siftc.artifact.trusting)."""
    import click
    return click.option("--trust-source", is_flag=True,
                        help="Let an artifact that needs its model file (a --leaf user module, or format "
                             "v2) import and run that file.")(f)
