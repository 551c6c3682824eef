"""Rule vcc_submission: a Virtual Cell Challenge submission (.vcc) from an adapted target prediction."""

from ccfm.adapt.submission import SubmissionFiles, SubmissionSettings, write_vcc_submission
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
settings = snakemake.params.settings
write_vcc_submission(
    SubmissionFiles(
        snakemake.input.pred,
        snakemake.input.target_raw,
        snakemake.input.target,
        snakemake.output.vcc,
        snakemake.output.summary,
    ),
    SubmissionSettings(
        method=snakemake.wildcards.method,
        seed=snakemake.params.seed,
        perturbations=snakemake.params.perturbations,
        input_scale=settings["input_scale"],
        target_sum=settings["target_sum"],
        chunk_size=settings["chunk_size"],
    ),
)
