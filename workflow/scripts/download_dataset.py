"""Rules download_dataset / download_target: fetch a configured h5ad with checksum and resume.

The checksums come from the config here, not from rule params, so that pinning one after the
first download (as config/README.md advises) does not make Snakemake redo the download and
every result built on it. A file already in place is verified whenever the rule runs.
"""

from pathlib import Path

from ccfm.data.download import download_dataset
from ccfm.logs import setup_rule

setup_rule(snakemake.log[0], snakemake.threads)
spec = snakemake.config["datasets"][snakemake.wildcards.ds]
if snakemake.params.block == "target":
    spec = spec["target"]
download_dataset(
    snakemake.params.url,
    Path(snakemake.output.raw),
    md5=spec.get("md5"),
    sha256=spec.get("sha256"),
    allow_unverified=bool(spec.get("allow_unverified", False)),
    allow_http=bool(spec.get("allow_http", False)),
)
