"""`python -m raydiff.train --config FILE [key=value ...]`: the same as `raydiff train`, for
`ray job submit -- python -m raydiff.train ...`."""

import sys

from raydiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
