"""Write the small real data sets the examples and benchmarks train on, without a download.

    data/digits.npz   scikit-learn's bundled 8x8 handwritten digits: x (1797, 64) float32 in [0, 1],
                      y (1797,) int64 labels 0..9 (the UCI optdigits test set, shipped inside sklearn)
    data/stdlib.txt   about 600 KB of Python's own standard library source, for byte-level language
                      modelling (a fixed list of modules, so every machine with this Python gets the same text)

    python examples/make_data.py [--out data]
"""
import argparse
import sysconfig
from pathlib import Path

import numpy as np

# Prose-rich, plain-Python modules; read in this order until MAX_TEXT_BYTES.
TEXT_MODULES = ["textwrap.py", "difflib.py", "argparse.py", "heapq.py", "fractions.py", "statistics.py",
                "string.py", "calendar.py", "csv.py", "shlex.py", "pprint.py", "dataclasses.py",
                "functools.py", "bisect.py", "random.py", "contextlib.py", "glob.py", "fnmatch.py",
                "ipaddress.py", "gettext.py", "configparser.py", "locale.py", "tempfile.py"]
MAX_TEXT_BYTES = 600_000


def digits(out: Path) -> Path:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the digits data ship inside scikit-learn: pip install 'siftc[data]'") from None
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)  # (1797, 64), pixel counts 0..16 scaled to [0, 1]
    y = d.target.astype(np.int64)           # (1797,)
    path = out / "digits.npz"
    np.savez_compressed(path, x=x, y=y)
    return path


def stdlib_text(out: Path) -> Path:
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for name in TEXT_MODULES:
        f = lib / name
        if not f.is_file():
            continue
        text = f.read_bytes()
        parts.append(text[:MAX_TEXT_BYTES - size])
        size += len(parts[-1])
        if size >= MAX_TEXT_BYTES:
            break
    path = out / "stdlib.txt"
    path.write_bytes(b"".join(parts))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (digits(out), stdlib_text(out)):
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
