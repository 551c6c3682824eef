"""Rule scgpt_download: fetch and verify the pretrained scGPT whole-human checkpoint.

Settings come from the config's `scgpt` block, not rule params (see the rule's comment).
"""

from pathlib import Path

from ccfm.config import scgpt_settings
from ccfm.logs import setup_rule
from ccfm.scgpt.checkpoint import download_whole_human

setup_rule(snakemake.log[0], snakemake.threads)
settings = scgpt_settings(snakemake.config)  # defaults: the schema's
download_whole_human(
    Path(snakemake.output.model).parent,
    folder_id=settings["whole_human_gdrive_folder"],
    mirror_url=settings["whole_human_url"],
    sha256=settings["whole_human_sha256"],
    allow_http=settings["allow_http"],
)
