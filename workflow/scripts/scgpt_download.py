"""Rule scgpt_download: fetch and verify the pretrained scGPT whole-human checkpoint.

`params.settings` is the config's `scgpt` block over the schema's defaults, derived in a way Snakemake
does not track (see the rule): pinning a digest or adding a mirror must not re-download it.
"""

from pathlib import Path

from ccfm.logs import setup_rule
from ccfm.scgpt.checkpoint import download_whole_human

setup_rule(snakemake.log[0], snakemake.threads)
settings = snakemake.params.settings
download_whole_human(
    Path(snakemake.output.model).parent,
    folder_id=settings["whole_human_gdrive_folder"],
    mirror_url=settings["whole_human_url"],
    sha256=settings["whole_human_sha256"],
    allow_http=settings["allow_http"],
)
