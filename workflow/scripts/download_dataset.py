"""Rules download_dataset / download_target: fetch a configured h5ad with checksum and resume.

The checksums and the two allow_* switches come in `params.verify`, which the rule derives in a way
Snakemake does not track (see the rule), so that pinning a checksum after the first download (as
config/README.md advises) does not make Snakemake redo the download and every result built on it.
A file already in place is verified whenever the rule runs.
"""

from pathlib import Path

from ccfm.data.download import download_dataset
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
verify = snakemake.params.verify[snakemake.params.block]
download_dataset(
    snakemake.params.url,
    Path(snakemake.output.raw),
    md5=verify["md5"],
    sha256=verify["sha256"],
    allow_unverified=bool(verify["allow_unverified"]),
    allow_http=bool(verify["allow_http"]),
)
