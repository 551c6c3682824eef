# CCFM: Cascaded Conditioned Flow Matching for single-cell perturbation prediction.
# `snakemake -c2` runs every dataset in config `run` (the simulated demo by default);
# `snakemake -c2 <dataset>` runs one dataset; `snakemake --report report.html` builds the report.

from snakemake.utils import min_version

min_version("9.10")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/scgpt.smk"
include: "workflow/rules/ccfm.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/adapt.smk"
include: "workflow/rules/state.smk"


rule all:
    input:
        [target for ds in config["run"] for target in dataset_targets(ds)],
    default_target: True


# One target rule per declared dataset, named after it: `snakemake -c2 norman`.
for _dataset in config["datasets"]:

    rule:
        name:
            _dataset
        input:
            dataset_targets(_dataset),
