"""Rule calibrate_latent: running mean/var of frozen scGPT features over a fold's training cells."""

from pathlib import Path

import torch

from ccfm.scgpt.calibration import calibrate, training_cell_indices
from ccfm.scgpt.extractor import ScGPTFeatureExtractor
from ccfm.logs import setup_rule_logging
from ccfm.scgpt.vocab import read_gene_vocab, vocab_id_array

log = setup_rule_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
latent = snakemake.params.latent
mapping = read_gene_vocab(snakemake.input.gene_vocab)
extractor = ScGPTFeatureExtractor(
    Path(snakemake.input.model).parent,
    vocab_id_array(mapping),
    device="cuda" if torch.cuda.is_available() else "cpu",
    max_tokens_per_cell=latent["max_tokens_per_cell"],
    seed=snakemake.params.seed,
    batching=latent.get("batching", "auto"),
    zero_tokens=bool(latent["zero_tokens"]),
)
cells = training_cell_indices(snakemake.input.processed, snakemake.input.split)
log.info("fold %s: %d training cells (training perturbations + controls)", snakemake.wildcards.fold, len(cells))
stats = calibrate(
    extractor,
    snakemake.input.processed,
    cells,
    batch_size=latent["batch_size"],
    max_cells=latent["calibration_cells"],
    seed=snakemake.params.seed,
    target_std=latent["target_std"],
    genes=list(mapping["gene"]),
)
stats.save(snakemake.output.stats)
