"""Entry point: ``python -m benchmarks`` runs the sidecar-vs-baseline benchmark (see run.py)."""

import sys

from benchmarks.run import main

sys.exit(main(sys.argv[1:]))
