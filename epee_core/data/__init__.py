"""Labelled data sets: JSON Lines text readers, MedMNIST `.npz` and image-folder readers, the rule for unusable
rows, seeded samples, the embedded demo set, and the public data sets the reports use (`catalogue`, `splits`)."""

from pathlib import Path

from .images import read_image_examples
from .rows import RowProblems, TaskData, UnusableRowsError
from .sampling import stratified_sample
from .text import label_tensor, label_vocabulary, read_examples, read_task_examples

# The embedded demo set: a few hundred ADE sentences (README.md in this folder says which and under what licence).
DEMO_DATA_DIR = Path(__file__).resolve().parent

__all__ = [
    "DEMO_DATA_DIR",
    "RowProblems",
    "TaskData",
    "UnusableRowsError",
    "label_tensor",
    "label_vocabulary",
    "read_examples",
    "read_image_examples",
    "read_task_examples",
    "stratified_sample",
]
