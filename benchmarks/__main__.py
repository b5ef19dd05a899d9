"""`python -m cdam_fast.benchmarks ...` is `cdam-fast bench ...`."""
import sys

from .cli import main

sys.exit(main())
