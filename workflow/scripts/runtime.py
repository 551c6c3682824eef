"""Rule runtime: the dataset's per-job wall time, CPU time and memory from the benchmark files."""

from ccfm.evaluate.runtime import write_runtime_report
from ccfm.logs import setup_rule

log = setup_rule(snakemake.log[0], snakemake.threads)
table = write_runtime_report(
    snakemake.params.benchmark_dirs, snakemake.output.table, snakemake.output.png, snakemake.wildcards.ds
)
log.info(
    "%d jobs, %.1f s wall time summed; slowest: %s",
    len(table),
    table["seconds"].sum(),
    ", ".join(f"{row.job} {row.seconds:.1f} s" for row in table.head(5).itertuples()),
)
