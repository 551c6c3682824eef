# CCFM: Cascaded Conditioned Flow Matching for single-cell perturbation prediction.
# `snakemake -c2` runs every dataset in config `run` (the simulated demo by default);
# `snakemake -c2 <dataset>` runs one dataset; `snakemake --report report.html` builds the report.

from pathlib import Path

from snakemake.utils import min_version

min_version("9.10")


# config/config.yaml of the working directory (`--directory`), else the one shipped with the workflow.
configfile: str(next(p for p in (Path("config/config.yaml"), Path(workflow.basedir) / "config/config.yaml") if p.exists()))


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/scgpt.smk"
include: "workflow/rules/ccfm.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/adapt.smk"
include: "workflow/rules/state.smk"


rule all:
    default_target: True
    input:
        [target for ds in config["run"] for target in dataset_targets(ds)],


# One target rule per declared dataset, named after it: `snakemake -c2 norman`.
for _dataset in config["datasets"]:

    rule:
        name:
            _dataset
        input:
            dataset_targets(_dataset),

    # `snakemake -c2 <dataset>_vcc`: the Virtual Cell Challenge submissions only (and what they need).
    if has_target(_dataset):

        rule:
            name:
                f"{_dataset}_vcc"
            input:
                vcc_targets(_dataset),


onsuccess:
    print_headlines()
