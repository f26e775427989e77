"""Online serving benchmark: `python bench/serve.py --help` (the load generator is fleetctl.loadgen)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from fleetctl.bench_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
