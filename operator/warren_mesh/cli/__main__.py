"""`python -m warren_mesh.cli`: what the tests, the lab and the benchmarks run."""

import sys

from warren_mesh.cli.main import main

sys.exit(main())
