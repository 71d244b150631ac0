"""The public data sets the reports train and measure on (docs/results.md, docs/performance.md): each set's task,
where its splits lie below a data folder, and the scores papers publish on it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    """A score a paper reports on the same data set (its split may differ from ours: `split` says which)."""

    model: str
    metric: str
    value: float
    split: str
    source: str


@dataclass(frozen=True)
class DataSet:
    name: str
    task: str
    train: str  # relative to the data folder
    dev: str
    epochs: int | None = None  # overrides the recipe (ADE is 4–6× larger than the other sets: one epoch)
    published: tuple[Published, ...] = ()
    not_compared: str | None = None  # why no published score stands beside ours


MEDMNIST = "MedMNIST v2 (Yang et al., 2023, Sci. Data), benchmark table"
BLURB = "BLURB (Gu et al., 2021, ACM HEALTH), Table 6, mean of 5 runs"
DDI_PUBLISHED = (
    Published("PubMedBERT (base, 110 M)", "micro_f1", 0.8236, "official test split", BLURB),
    Published("BERT-base uncased (110 M)", "micro_f1", 0.8004, "official test split", BLURB),
)
PNEUMONIAMNIST_PUBLISHED = (
    Published("ResNet-18 (28 × 28)", "accuracy", 0.854, "official test split", MEDMNIST),
    Published("Google AutoML Vision", "accuracy", 0.946, "official test split", MEDMNIST),
)
DATASETS = {
    "ade": DataSet(
        "ade",
        "text-classification",
        "ade/train.jsonl",
        "ade/dev.jsonl",
        epochs=1,
        not_compared="no fully supervised score on a fixed split of ADE-Corpus-V2 sentences that we could find",
    ),
    "ddi": DataSet(
        "ddi",
        "relation-extraction",
        "ddi/train.jsonl",
        "ddi/dev.jsonl",
        published=DDI_PUBLISHED,
    ),
    "git": DataSet(
        "git",
        "relation-extraction",
        "git/train.jsonl",
        "git/dev.jsonl",
        not_compared="BiomedRAG (Li et al., 2024) reports end-to-end triple extraction on GIT, not relation "
        "classification with given entities",
    ),
    "chemprot": DataSet(
        "chemprot",
        "multi-label",
        "chemprot_multilabel/train.jsonl",
        "chemprot_multilabel/dev.jsonl",
        not_compared="our multi-label sentence task is derived from ChemProt; published ChemProt scores are for "
        "per-pair relation extraction",
    ),
    "pneumoniamnist": DataSet(
        "pneumoniamnist",
        "image-classification",
        "pneumoniamnist/pneumoniamnist.npz",
        "pneumoniamnist/pneumoniamnist.npz",
        published=PNEUMONIAMNIST_PUBLISHED,
    ),
}
