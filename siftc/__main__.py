"""`python -m siftc ...` is the `siftc` command (torchrun's `-m` launches it this way)."""
import sys

from siftc.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="siftc"))
