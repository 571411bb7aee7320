"""Run ``kvstack bench gpu`` before the integrator registers it: ``python3 scripts/gpu/proof.py --help``."""

import typer

from kvstack.bench.gpu import gpu_proof

if __name__ == "__main__":
    typer.run(gpu_proof)
