"""The simulated world of the demo dataset: genes, network, pathway modules and each condition's true shift.

Generative model (all draws from one ``numpy.random.Generator`` seeded by the caller):

* **Genes**: a panel of real human symbols (common housekeeping genes and transcription factors,
  so scGPT vocabulary mapping has real work to do) plus synthetic names (``synth_g001``...) that
  are in no vocabulary. Perturbed genes are real-symbol transcription factors in the panel.
* **Baseline**: per-gene log expression rates ``log_base`` (a skewed distribution, as in real
  data) and negative-binomial dispersions ``theta`` (counts over-dispersed, var > mean).
* **Network**: a sparse DAG ``W`` (regulator -> target weights). A perturbation sets a direct
  log-shift on its gene (CRISPRa-like activation for most, knock-down for some) that
  propagates downstream: ``s = d + W^T s`` (finite because W is nilpotent), then saturates
  (``c * tanh(s / c)``), so even "additive" doubles are mildly sub-additive.
* **Pathway modules** (``interaction_model: pathway``, the default): every perturbed gene
  belongs to one of ``n_modules`` modules; hitting a gene activates its module's downstream
  program (a signed gene set) through a saturating response ``L·tanh(a/L)``, so singles of one
  module share a program (discoverable from the singles) and module members are co-expressed in
  control cells (a module activity program). A double's interaction is a function of the pair:
  ``same_module`` (the shared program saturates: far less than the sum), ``cooperating`` (two
  modules listed as cooperating switch on a joint program that neither does alone) or
  ``independent`` (additive). Pairs of interacting types are drawn preferentially.
* **Random interactions** (``interaction_model: random``, the earlier simulator): each double's
  type is drawn independently of its genes from ``interaction_mix``: ``additive``, ``synergy``,
  ``buffering`` or ``epistasis``. Additive is near-optimal for its means.
* The interaction vector ``shift(A+B) - shift(A) - shift(B)`` is recorded either way.
* **Target context** (H1-like): same network and responses, a per-gene baseline log-shift
  (``target_baseline_shift``); a subset of conditions is observed there.

Cells are drawn from the world by :mod:`ccfm.data.simulate_cells`; :mod:`ccfm.data.simulate` writes the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ccfm import COMBO_SEPARATOR

log = logging.getLogger(__name__)


# Transcription factors and signalling genes used as perturbation targets (real HGNC symbols).
PERTURBABLE_SYMBOLS = (
    "CEBPA",
    "CEBPB",
    "KLF1",
    "GATA1",
    "SPI1",
    "MYC",
    "JUN",
    "FOS",
    "EGR1",
    "IRF1",
    "STAT1",
    "TP53",
    "FOXA1",
    "SOX2",
    "RUNX1",
    "TAL1",
    "ETS1",
    "ELK1",
    "MAX",
    "NFKB1",
    "HOXA9",
    "CDKN1A",
    "ZBTB10",
    "TBX2",
)


# Housekeeping, ribosomal, metabolic and lineage genes (real HGNC symbols).
OTHER_SYMBOLS = (
    "ACTB",
    "GAPDH",
    "TUBB",
    "TUBA1B",
    "B2M",
    "EEF1A1",
    "EEF2",
    "PGK1",
    "LDHA",
    "ENO1",
    "PKM",
    "ALDOA",
    "TPI1",
    "HPRT1",
    "TBP",
    "PPIA",
    "RPLP0",
    "RPL3",
    "RPL4",
    "RPL5",
    "RPL7",
    "RPL10",
    "RPL11",
    "RPL13",
    "RPS3",
    "RPS6",
    "RPS8",
    "RPS12",
    "RPS18",
    "RPS27A",
    "HSP90AA1",
    "HSPA8",
    "HSPA5",
    "CALM1",
    "CFL1",
    "PFN1",
    "MYL6",
    "VIM",
    "FTL",
    "FTH1",
    "UBC",
    "UBB",
    "YWHAZ",
    "SDHA",
    "GUSB",
    "HMBS",
    "POLR2A",
    "NPM1",
    "NCL",
    "HNRNPA1",
    "SRSF1",
    "SRSF2",
    "PABPC1",
    "EIF4A1",
    "EIF4G1",
    "ATP5F1A",
    "ATP5F1B",
    "COX4I1",
    "NDUFA4",
    "CYCS",
    "MKI67",
    "TOP2A",
    "PCNA",
    "MCM2",
    "MCM3",
    "MCM7",
    "CCNB1",
    "CCND1",
    "CCNE1",
    "CDK1",
    "CDK2",
    "CDK4",
    "CDK6",
    "E2F1",
    "RB1",
    "BCL2",
    "BAX",
    "MDM2",
    "GADD45A",
    "ATF3",
    "HBG1",
    "HBG2",
    "HBB",
    "HBA1",
    "GYPA",
    "TFRC",
    "CD34",
    "PTPRC",
    "ITGAM",
    "CD14",
    "LYZ",
    "MPO",
    "ELANE",
    "CSF1R",
    "CSF3R",
    "IL1B",
    "TNF",
    "CXCL8",
    "CCL2",
    "SOCS3",
    "ISG15",
    "IFIT1",
    "MX1",
    "OAS1",
    "IRF7",
    "STAT3",
    "JUNB",
    "FOSB",
    "EGR2",
    "EGR3",
    "NR4A1",
    "DUSP1",
    "DUSP6",
    "KLF4",
    "KLF6",
    "ID1",
    "ID2",
    "HES1",
    "NOTCH1",
    "SOX4",
    "LMO2",
    "GFI1",
    "GFI1B",
    "ZFPM1",
    "NFE2",
    "KIT",
    "FLI1",
    "MEIS1",
    "PBX1",
    "LYL1",
    "SLC2A1",
    "SLC25A5",
    "VEGFA",
    "HIF1A",
    "EPAS1",
    "CTNNB1",
    "AXIN2",
    "LEF1",
    "TCF7",
    "SMAD3",
)


INTERACTION_MODELS = ("pathway", "random")


PAIR_TYPES = ("same_module", "cooperating", "independent")


@dataclass
class SimulationSizes:
    """Sizes of the demo simulation (the dataset's ``simulate:`` config block overrides these)."""

    n_genes: int = 300
    n_real_symbols: int = 150
    n_singles: int = 18
    n_doubles: int = 36
    n_control_cells: int = 1500
    cells_per_condition: int = 100
    n_target_control_cells: int = 1200
    n_target_singles: int = 8
    n_target_doubles: int = 6
    target_cells_per_condition: int = 100
    mean_library_size: float = 1500.0
    target_library_scale: float = 1.3
    knockdown_fraction: float = 0.25
    interaction_model: str = "pathway"  # "pathway" (interactions follow modules) or "random"
    interaction_mix: dict[str, float] = field(
        default_factory=lambda: {"additive": 0.25, "synergy": 0.3, "buffering": 0.3, "epistasis": 0.15}
    )
    # Pathway model: modules, their downstream programs and the saturation of a program's response.
    n_modules: int = 6
    program_genes: int = 30
    joint_program_genes: int = 25
    cooperating_fraction: float = 0.4
    program_saturation: float = 1.0
    program_scale: float = 1.5  # SD of a programme gene's log-rate loading
    # Relative odds of drawing a double of each pair type (interacting pairs are oversampled).
    pair_type_odds: dict[str, float] = field(
        default_factory=lambda: {"same_module": 3.0, "cooperating": 3.0, "independent": 1.0}
    )
    coexpression_sd: float = 0.35

    def validate(self) -> None:
        """Raise ValueError when sizes are inconsistent, naming the key to change."""
        n_symbols = len(PERTURBABLE_SYMBOLS) + len(OTHER_SYMBOLS)
        if not 0 < self.n_singles <= len(PERTURBABLE_SYMBOLS):
            raise ValueError(f"simulate.n_singles must be in 1..{len(PERTURBABLE_SYMBOLS)}, got {self.n_singles}")
        if not self.n_singles <= self.n_real_symbols <= min(n_symbols, self.n_genes):
            raise ValueError(
                f"simulate.n_real_symbols must be between n_singles ({self.n_singles}) and "
                f"min({n_symbols}, n_genes={self.n_genes}), got {self.n_real_symbols}"
            )
        max_doubles = self.n_singles * (self.n_singles - 1) // 2
        if not 0 <= self.n_doubles <= max_doubles:
            raise ValueError(f"simulate.n_doubles must be in 0..{max_doubles} for {self.n_singles} singles")
        if self.n_target_singles > self.n_singles or self.n_target_doubles > self.n_doubles:
            raise ValueError("simulate.n_target_singles/n_target_doubles exceed the source conditions")
        if abs(sum(self.interaction_mix.values()) - 1.0) > 1e-6:
            raise ValueError("simulate.interaction_mix fractions must sum to 1")
        if self.interaction_model not in INTERACTION_MODELS:
            raise ValueError(
                f"simulate.interaction_model must be one of {INTERACTION_MODELS}, got {self.interaction_model!r}"
            )
        if self.interaction_model == "pathway":
            if not 1 <= self.n_modules <= self.n_singles:
                raise ValueError(f"simulate.n_modules must be in 1..n_singles ({self.n_singles}), got {self.n_modules}")
            if self.program_genes + self.joint_program_genes > self.n_genes - self.n_singles:
                raise ValueError("simulate.program_genes + joint_program_genes exceed the genes that are not perturbed")
            if set(self.pair_type_odds) != set(PAIR_TYPES) or min(self.pair_type_odds.values()) < 0:
                raise ValueError(f"simulate.pair_type_odds needs non-negative odds for exactly {PAIR_TYPES}")


@dataclass
class SimulatedWorld:
    """The ground truth of one simulation: genes, network and per-condition log-rate shifts."""

    genes: np.ndarray
    is_real_symbol: np.ndarray
    log_base: np.ndarray
    theta: np.ndarray
    grn: np.ndarray
    perturbed_genes: np.ndarray
    perturbation_sign: np.ndarray
    conditions: np.ndarray
    condition_type: np.ndarray
    interaction_type: np.ndarray
    shifts: np.ndarray  # conditions x genes, log-rate shift vs control (before normalisation)
    additive_shifts: np.ndarray  # sum of the singles' shifts (= shifts for singles)
    programs: np.ndarray  # 2 x genes loadings of shared cell-state programs
    target_baseline_shift: np.ndarray
    target_conditions: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    # Pathway model only (empty otherwise): module of each perturbed gene, cooperating module pairs.
    module_of: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    cooperating_modules: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))


def _gene_panel(sizes: SimulationSizes, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gene names (real symbols then synthetic, shuffled), real-symbol mask, perturbed genes."""
    perturbed = rng.choice(np.array(PERTURBABLE_SYMBOLS), size=sizes.n_singles, replace=False)
    pool = np.array([g for g in PERTURBABLE_SYMBOLS + OTHER_SYMBOLS if g not in set(perturbed)])
    others = rng.choice(pool, size=sizes.n_real_symbols - sizes.n_singles, replace=False)
    n_synthetic = sizes.n_genes - sizes.n_real_symbols
    synthetic = np.array([f"synth_g{i:03d}" for i in range(1, n_synthetic + 1)])
    genes = np.concatenate([perturbed, others, synthetic])
    order = rng.permutation(genes.size)
    genes = genes[order]
    is_real = np.isin(genes, np.concatenate([perturbed, others]))
    return genes.astype(str), is_real, np.sort(perturbed).astype(str)


def _network(genes: np.ndarray, perturbed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sparse DAG weights ``W[i, j]`` (regulator i -> target j); perturbed TFs regulate most."""
    n = genes.size
    is_tf = np.isin(genes, perturbed)
    # Topological order: perturbed TFs first (so they can regulate each other and everything else).
    order = np.concatenate([rng.permutation(np.flatnonzero(is_tf)), rng.permutation(np.flatnonzero(~is_tf))])
    weights = np.zeros((n, n), dtype=np.float64)
    for position, target in enumerate(order[1:], start=1):
        earlier = order[:position]
        n_regulators = min(int(rng.integers(0, 4)), earlier.size)
        if n_regulators == 0:
            continue
        # Prefer TFs as regulators (3:1) so perturbations reach many downstream genes.
        preference = np.where(is_tf[earlier], 3.0, 1.0)
        regulators = rng.choice(earlier, size=n_regulators, replace=False, p=preference / preference.sum())
        weights[regulators, target] = rng.normal(0.0, 0.7, size=n_regulators)
    return weights


def _propagate(direct: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Solve ``s = d + W^T s`` on a DAG by fixed-point iteration (exact after depth steps)."""
    shift = direct.copy()
    for _ in range(weights.shape[0]):
        updated = direct + weights.T @ shift
        if np.allclose(updated, shift, atol=1e-12):
            break
        shift = updated
    return shift


def _saturate(shift: np.ndarray, limit: float = 3.0) -> np.ndarray:
    """Bounded log-fold changes: large combined effects saturate, as expression does."""
    return limit * np.tanh(shift / limit)


def _double_shift(
    kind: str, lin_ab: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Log-rate shift of a double under its interaction type."""
    if kind == "additive":
        return _saturate(lin_ab)
    if kind == "synergy":
        # The joint effect exceeds the sum: amplified overall, and genes moved by both partners
        # in the same direction move further still.
        shared = np.sign(s_a) == np.sign(s_b)
        boost = rng.uniform(1.0, 1.5) * np.sqrt(np.abs(s_a * s_b)) * np.sign(s_a + s_b) * shared
        return _saturate(rng.uniform(1.5, 1.9) * lin_ab + boost, limit=4.5)
    if kind == "buffering":
        return _saturate(rng.uniform(0.35, 0.6) * lin_ab)
    if kind == "epistasis":
        # A dominant partner (the one with the larger effect) masks most of the other's effect.
        dominant, masked = (s_a, s_b) if np.abs(s_a).sum() >= np.abs(s_b).sum() else (s_b, s_a)
        return _saturate(dominant + 0.15 * masked)
    raise ValueError(f"unknown interaction type {kind!r}")


@dataclass
class _Doubles:
    names: list[str]
    kinds: list[str]
    shifts: list[np.ndarray]


def _random_doubles(
    sizes: SimulationSizes,
    perturbed: np.ndarray,
    linear: dict[str, np.ndarray],
    single_shift: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> _Doubles:
    """Doubles whose interaction type is drawn independently of their genes (the earlier model)."""
    pairs = [(a, b) for i, a in enumerate(perturbed) for b in perturbed[i + 1 :]]
    chosen = rng.choice(len(pairs), size=sizes.n_doubles, replace=False)
    kinds_list = list(sizes.interaction_mix)
    kinds = rng.choice(kinds_list, size=sizes.n_doubles, p=[sizes.interaction_mix[k] for k in kinds_list])
    out = _Doubles([], [], [])
    for pair_index, kind in zip(sorted(chosen), kinds):
        a, b = pairs[pair_index]
        out.names.append(f"{a}+{b}"), out.kinds.append(str(kind))
        out.shifts.append(_double_shift(str(kind), linear[a] + linear[b], single_shift[a], single_shift[b], rng))
    return out


@dataclass
class _Pathways:
    module_of: dict[str, int]
    activation: dict[str, float]
    programs: np.ndarray  # modules x genes
    joint: dict[tuple[int, int], np.ndarray]  # cooperating (m1 < m2) -> joint program

    def response(self, activation: float, saturation: float) -> float:
        return saturation * float(np.tanh(activation / saturation))

    def pair_type(self, a: str, b: str) -> str:
        ma, mb = self.module_of[a], self.module_of[b]
        if ma == mb:
            return "same_module"
        return "cooperating" if (min(ma, mb), max(ma, mb)) in self.joint else "independent"


def _signed_program(n: int, candidates: np.ndarray, size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    program = np.zeros(n)
    members = rng.choice(candidates, size=size, replace=False)
    program[members] = rng.normal(0.0, scale, size=size)
    return program


def _pathways(
    sizes: SimulationSizes, genes: np.ndarray, perturbed: np.ndarray, sign: np.ndarray, rng: np.random.Generator
) -> _Pathways:
    """Modules of the perturbed genes, their programs and the cooperating module pairs."""
    n = genes.size
    order = rng.permutation(perturbed.size)
    module_of = {str(perturbed[i]): rank % sizes.n_modules for rank, i in enumerate(order)}
    activation = {str(g): float(s * rng.uniform(0.8, 1.25)) for g, s in zip(perturbed, sign)}
    downstream = np.flatnonzero(~np.isin(genes, perturbed))
    programs = np.stack(
        [_signed_program(n, downstream, sizes.program_genes, sizes.program_scale, rng) for _ in range(sizes.n_modules)]
    )
    module_pairs = [(i, j) for i in range(sizes.n_modules) for j in range(i + 1, sizes.n_modules)]
    n_coop = int(round(sizes.cooperating_fraction * len(module_pairs)))
    picked = rng.choice(len(module_pairs), size=n_coop, replace=False) if n_coop else []
    joint = {
        module_pairs[k]: _signed_program(n, downstream, sizes.joint_program_genes, sizes.program_scale, rng)
        for k in sorted(picked)
    }
    return _Pathways(module_of, activation, programs, joint)


def _pathway_single(p: _Pathways, gene: str, saturation: float) -> np.ndarray:
    return p.response(p.activation[gene], saturation) * p.programs[p.module_of[gene]]


def _pathway_double(p: _Pathways, a: str, b: str, saturation: float) -> np.ndarray:
    """Programme part of a double's shift: a function of the pair's modules only."""
    ma, mb = p.module_of[a], p.module_of[b]
    if ma == mb:  # one shared programme, driven by both: it saturates
        return p.response(p.activation[a] + p.activation[b], saturation) * p.programs[ma]
    shift = _pathway_single(p, a, saturation) + _pathway_single(p, b, saturation)
    joint = p.joint.get((min(ma, mb), max(ma, mb)))
    if joint is not None:  # both modules on: the joint programme, as strong as the weaker partner
        weaker = min(abs(p.activation[a]), abs(p.activation[b]))
        shift = shift + p.response(weaker, saturation) * joint
    return shift


def _pathway_doubles(
    sizes: SimulationSizes,
    perturbed: np.ndarray,
    linear: dict[str, np.ndarray],
    pathways: _Pathways,
    rng: np.random.Generator,
) -> _Doubles:
    """Doubles drawn with odds by pair type; shift = network part + programme part."""
    pairs = [(str(a), str(b)) for i, a in enumerate(perturbed) for b in perturbed[i + 1 :]]
    kinds = [pathways.pair_type(a, b) for a, b in pairs]
    odds = np.array([sizes.pair_type_odds[k] for k in kinds], dtype=np.float64)
    if np.count_nonzero(odds) < sizes.n_doubles:
        raise ValueError("simulate.pair_type_odds leave fewer possible pairs than n_doubles")
    chosen = np.sort(rng.choice(len(pairs), size=sizes.n_doubles, replace=False, p=odds / odds.sum()))
    out = _Doubles([], [], [])
    for index in chosen:
        a, b = pairs[index]
        network = _saturate(linear[a] + linear[b])
        out.names.append(f"{a}+{b}"), out.kinds.append(kinds[index])
        out.shifts.append(network + _pathway_double(pathways, a, b, sizes.program_saturation))
    return out


def build_world(sizes: SimulationSizes, rng: np.random.Generator) -> SimulatedWorld:
    """Draw genes, network, baselines and the true shift of every condition."""
    sizes.validate()
    genes, is_real, perturbed = _gene_panel(sizes, rng)
    n = genes.size
    log_base = rng.normal(0.0, 1.5, size=n)  # skewed rates once exponentiated
    theta = np.exp(rng.normal(np.log(3.0), 0.6, size=n))  # NB dispersion: var = mu + mu^2/theta
    weights = _network(genes, perturbed, rng)
    sign = np.where(rng.random(perturbed.size) < sizes.knockdown_fraction, -1.0, 1.0)
    gene_index = {g: i for i, g in enumerate(genes)}
    pathway = sizes.interaction_model == "pathway"
    # The pathway model moves most of a perturbation's effect into its module programme, so its
    # private network effect is smaller.
    direct_size = (1.0, 2.0) if pathway else (2.0, 3.5)

    linear: dict[str, np.ndarray] = {}
    single_shift: dict[str, np.ndarray] = {}
    for gene, direction in zip(perturbed, sign):
        direct = np.zeros(n)
        direct[gene_index[gene]] = direction * rng.uniform(*direct_size)
        linear[gene] = _propagate(direct, weights)
        single_shift[gene] = _saturate(linear[gene])

    programs = rng.normal(0.0, 0.25, size=(2, n)) * (rng.random((2, n)) < 0.3)
    module_of = np.array([], dtype=np.int64)
    cooperating = np.zeros((0, 2), dtype=np.int64)
    if pathway:
        paths = _pathways(sizes, genes, perturbed, sign, rng)
        for gene in perturbed:
            single_shift[str(gene)] = single_shift[str(gene)] + _pathway_single(
                paths, str(gene), sizes.program_saturation
            )
        doubles = _pathway_doubles(sizes, perturbed, linear, paths, rng)
        # Module members co-vary in control cells: one activity programme per module.
        membership = np.zeros((sizes.n_modules, n))
        for gene, module in paths.module_of.items():
            membership[module, gene_index[gene]] = sizes.coexpression_sd
        programs = np.concatenate([programs, membership])
        module_of = np.array([paths.module_of[str(g)] for g in perturbed], dtype=np.int64)
        cooperating = np.array(sorted(paths.joint), dtype=np.int64).reshape(-1, 2)
    else:
        doubles = _random_doubles(sizes, perturbed, linear, single_shift, rng)

    names = [str(g) for g in perturbed] + doubles.names
    types = ["single"] * perturbed.size + ["double"] * len(doubles.names)
    interactions = ["none"] * perturbed.size + doubles.kinds
    shifts = [single_shift[str(g)] for g in perturbed] + doubles.shifts
    additive = [single_shift[str(g)] for g in perturbed] + [
        single_shift[name.split(COMBO_SEPARATOR)[0]] + single_shift[name.split(COMBO_SEPARATOR)[1]]
        for name in doubles.names
    ]
    return SimulatedWorld(
        genes=genes,
        is_real_symbol=is_real,
        log_base=log_base,
        theta=theta,
        grn=weights,
        perturbed_genes=perturbed,
        perturbation_sign=sign,
        conditions=np.array(names, dtype=str),
        condition_type=np.array(types, dtype=str),
        interaction_type=np.array(interactions, dtype=str),
        shifts=np.asarray(shifts),
        additive_shifts=np.asarray(additive),
        programs=programs,
        target_baseline_shift=rng.normal(0.0, 0.5, size=n),
        module_of=module_of,
        cooperating_modules=cooperating,
    )
