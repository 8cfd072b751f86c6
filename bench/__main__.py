"""`python -m bench [--quick] [--peers a,b] [--workloads w,...]`."""

from __future__ import annotations

import sys

from bench.run import main

sys.exit(main())
