"""Rule simulate_demo: seeded simulated dataset (source + target context + ground truth)."""

from pathlib import Path

from ccfm.data.simulate import simulate_demo
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
out_dir = Path(snakemake.output.raw).parent
written = simulate_demo(out_dir, seed=snakemake.params.seed, **dict(snakemake.params.sizes))
expected = {Path(snakemake.output.raw), Path(snakemake.output.target_raw), Path(snakemake.output.ground_truth)}
if {Path(p) for p in written.values()} != expected:
    raise RuntimeError(
        f"simulate_demo wrote {sorted(map(str, written.values()))}, expected {sorted(map(str, expected))}"
    )
