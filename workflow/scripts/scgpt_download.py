"""Rule scgpt_download: fetch and verify the pretrained scGPT whole-human checkpoint.

Settings come from the config's `scgpt` block, not rule params (see the rule's comment).
"""

from pathlib import Path

from ccfm.logs import setup_rule_logging
from ccfm.scgpt.checkpoint import download_whole_human

log = setup_rule_logging(snakemake.log[0])
settings = snakemake.config.get("scgpt", {})
download_whole_human(
    Path(snakemake.output.model).parent,
    folder_id=settings.get("whole_human_gdrive_folder", "1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y"),
    mirror_url=settings.get("whole_human_url"),
    sha256=settings.get("whole_human_sha256"),
    allow_http=bool(settings.get("allow_http", False)),
)
