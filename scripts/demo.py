"""`make demo`: the main job end to end on the embedded defaults.

Today: train a real model (scikit-learn MLP on the bundled digits), convert it for two device
profiles with the real CLI, and inspect both bundles. Each step prints the command it runs, so
the output doubles as a tutorial. Everything lands in ./demo-out (replaced on every run).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

PROFILES = ("rpi4", "rpi-zero2w")


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(args: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    done = subprocess.run(args, check=False)
    if done.returncode != 0:
        sys.exit(f"demo step failed (exit {done.returncode}): {' '.join(args)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    opts = parser.parse_args()
    out: Path = opts.out
    started = time.monotonic()

    banner("1/3 train a real model: scikit-learn MLP on the bundled digits data set")
    from model_tools.examples import train_digits_mlp

    example = train_digits_mlp(out / "model")
    print(f"trained {example.name}: eval accuracy {example.source_accuracy:.4f}; "
          f"{example.onnx_path} ({example.onnx_path.stat().st_size:,} bytes), calibration and "
          f"held-out eval sets beside it")

    tool = [sys.executable, "-m", "model_tools"]
    banner(f"2/3 convert it for {len(PROFILES)} device profiles (candidates timed and validated)")
    run(tool + ["profiles"])
    for profile in PROFILES:
        run(tool + ["convert", str(example.onnx_path), "--profile", profile,
                    "--out", str(out / "bundles" / profile), "--force",
                    "--calibration", str(example.calibration_path),
                    "--eval", str(example.eval_path), "--name", "digits", "--version", "1.0.0"])

    banner("3/3 inspect the bundles (re-verifies each model file's sha256 and length)")
    for profile in PROFILES:
        run(tool + ["inspect", str(out / "bundles" / profile)])

    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; bundles in "
          f"{out / 'bundles'}. Next: fleet_server and the agent (not built yet: see README).")


if __name__ == "__main__":
    main()
