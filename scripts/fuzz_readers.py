"""The full mutation run over every reader (the test suite runs a fast subset: tests/test_fuzz.py).

    python scripts/fuzz_readers.py                        # 2,000 mutants per format, seeds 0..
    python scripts/fuzz_readers.py --mutants 200 --seeds 3 --formats safetensors torch_zip

For each format of tests/helpers.py's FUZZ_FORMATS it makes a real checkpoint, mutates it (fixed seeds) and checks
every mutant: refused in one line, or read exactly as an independent reader reads it. It prints the outcomes by
mutation kind and exits 1 at the first mutant that is neither (naming its seed and index to replay it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import FUZZ_FORMATS, fuzz  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", type=int, default=2000, help="mutants per format and seed")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1")
    parser.add_argument("--formats", nargs="*", default=sorted(FUZZ_FORMATS), choices=sorted(FUZZ_FORMATS))
    args = parser.parse_args()
    for name in args.formats:
        for seed in range(args.seeds):
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                try:
                    outcomes = fuzz(FUZZ_FORMATS[name], Path(folder), seed=seed, count=args.mutants)
                except AssertionError as exc:
                    print(f"DEFECT {exc}")
                    return 1
            totals = ", ".join(f"{k} {outcomes[k]}" for k in ("refused", "read", "unchanged"))
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()) if ":" in k)
            print(f"{name:20s} seed {seed}: {args.mutants} mutants in {time.perf_counter() - start:.0f} s: {totals}")
            print(f"{'':20s}   {kinds}")
    print("no defect: every mutant was refused in one line or read as an independent reader reads it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
