"""fp32 vs int8 students: size, batch-1 model time and pipeline accuracy.

Run: ``.venv/bin/python bench/int8.py [--students results/bench-accuracy/students-rocoin.pt]``
(after ``bench/accuracy.py``). Exports an int8 bundle with ``rocoin export --int8``'s code path
and prints its report: the fp32 and int8 group models on the same test images.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from report import report_to

from rocoin.export import export_bundle
from rocoin.export.quantize import int8_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--students", type=Path, default=Path("results/bench-accuracy/students-rocoin.pt"))
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--eval-images", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/int8.txt"), help="also write the report here (the README's source)")
    args = parser.parse_args()
    with report_to(args.out):
        logging.basicConfig(level=logging.ERROR)
        calibration, evaluation = int8_data(args.students, None, args.calibration_images, args.eval_images)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / "bundle"
            export_bundle(args.students, bundle, int8_calibration=calibration, int8_eval=evaluation)
            report = json.loads((bundle / "int8-report.json").read_text())
        print(f"# {args.students}: {report['images']} test images, {args.calibration_images} calibration images")
        print(f"{'':>5} {'group models kB':>16} {'slowest group ms':>17} {'accuracy':>9}")
        for name in ("fp32", "int8"):
            r = report[name]
            print(f"{name:>5} {r['size_bytes'] / 1e3:>16.1f} {1e3 * r['slowest_group_s']:>17.3f} {r['accuracy']:>9.4f}")
        print(
            f"size ratio {report['int8']['size_bytes'] / report['fp32']['size_bytes']:.3f}, "
            f"speed-up {report['fp32']['slowest_group_s'] / report['int8']['slowest_group_s']:.2f}x, same answer on {100 * report['agreement']:.2f} %"
        )


if __name__ == "__main__":
    main()
