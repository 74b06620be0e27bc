"""What the commands' options share: defaults read from the library's config dataclasses, so `--help`
shows what a run really gets and cannot drift from it."""
from dataclasses import MISSING, fields


def defaults(cls) -> dict:
    """Field name -> default of the dataclass `cls`, for the fields that have a plain one.

    >>> defaults(ConvertConfig)["round_to"]
    1
    """
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
