"""Export the trained network of a finished run, without the training machinery.

    python benchmarks/export.py results/demo/mtsl/seed0 --format onnx --out mtsl.onnx
    python benchmarks/export.py results/demo/ltb/seed0 --format exported --out ltb.pt2

The file takes an image batch ``(N, 3, H, W)`` (the run's inputs, as its data feeds them) and returns one output
per task, in the run's task order. It is checked against the trained model on two of the run's test images (the
largest difference is printed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import baselines  # noqa: F401  (registers the baseline methods: load_run rebuilds a run of any of them)
from benchmarks.cli import run_main
from mtsl_plugin.experiment import load_run
from mtsl_plugin.export import FORMATS, check_format, export, static_network


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run's folder (holds result.json and model.pt)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the file to write")
    args = p.parse_args(argv)
    return run_main(lambda: write_export(args), args)


def write_export(args: argparse.Namespace) -> int:
    """Export the run ``args`` name and say how far the export's outputs are from the trained model's."""
    check_format(args.format)  # before the run is loaded
    if Path(args.out).resolve().is_relative_to(Path(args.run_dir).resolve()):
        raise ValueError(f"--out {args.out} lies in the run folder {args.run_dir}, whose files are the run's "
                         "own (weights, records); write the export elsewhere")
    trainer, data, config = load_run(args.run_dir, device="cpu")
    images, _ = next(iter(data.batches(data.test)), (None, None))
    if images is None:
        raise ValueError(f"the run in {args.run_dir} has no test images to check the export against")
    static = static_network(trainer.model, config.tasks)
    record = json.loads((Path(args.run_dir) / "result.json").read_text())
    metadata = {f"mtsl_plugin.{key}": json.dumps(record.get(key)) for key in ("method", "plan_text", "trained_by")}
    sample = images[:2]
    difference = export(static, args.format, args.out, sample, metadata)
    print(f"wrote {args.out} ({args.format}; tasks {', '.join(static.tasks)}); largest difference to the trained "
          f"model on {'one test image' if len(sample) == 1 else 'two test images'}: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
