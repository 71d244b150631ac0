"""`epee data convert`: each public source's published files (tiny hand-made copies in tests/fixtures/) become rows
our readers accept, with the documented labels and a deterministic split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from epee_core.cli import main
from epee_core.data import read_image_examples, read_task_examples
from epee_core.data.convert import CHEMPROT_GROUP_LABELS, convert, split_documents, split_sentences
from epee_core.engine.spec import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_rows(folder: Path) -> list[dict]:
    return read_rows(folder / "train.jsonl") + read_rows(folder / "dev.jsonl")


def test_ade_writes_each_sentence_once_and_positive_wins(tmp_path):
    convert("ade", FIXTURES / "ade", tmp_path, dev_fraction=0.25, seed=0)
    rows = all_rows(tmp_path)
    labels = {row["text"]: row["label"] for row in rows}
    assert len(rows) == len(labels) == 6
    assert labels["Rash developed after starting carbamazepine."] == 1
    assert labels["Lithium toxicity caused tremor."] == 1  # listed in DRUG-AE.rel and ADE-NEG.txt
    assert labels["No further events were reported."] == 0


def test_ade_puts_whole_abstracts_in_dev(tmp_path):
    convert("ade", FIXTURES / "ade", tmp_path, dev_fraction=0.25, seed=0)
    dev_texts = {row["text"] for row in read_rows(tmp_path / "dev.jsonl")}
    # PMID 100 has two sentences: both or neither are in dev.
    pmid_100 = {"Rash developed after starting carbamazepine.", "The patient was admitted in June."}
    assert pmid_100 <= dev_texts or not pmid_100 & dev_texts


def test_ade_split_is_the_same_for_the_same_seed(tmp_path):
    convert("ade", FIXTURES / "ade", tmp_path / "a", dev_fraction=0.5, seed=3)
    convert("ade", FIXTURES / "ade", tmp_path / "b", dev_fraction=0.5, seed=3)
    assert (tmp_path / "a" / "dev.jsonl").read_text() == (tmp_path / "b" / "dev.jsonl").read_text()


def test_ade_rows_read_as_text_classification(tmp_path):
    convert("ade", FIXTURES / "ade", tmp_path, dev_fraction=0.25, seed=0)
    data = read_task_examples(str(tmp_path / "train.jsonl"), "text-classification", "train")
    assert len(data.examples) == len(read_rows(tmp_path / "train.jsonl"))


def test_ade_names_file_and_line_of_a_malformed_negative(tmp_path):
    (tmp_path / "DRUG-AE.rel").write_text("1|A sentence.|effect|0|1|drug|2|3\n")
    (tmp_path / "ADE-NEG.txt").write_text("1 NEG fine.\n2 POS wrong tag\n")
    with pytest.raises(ConfigError, match=r"ADE-NEG.txt:2: expected 'PMID NEG sentence'"):
        convert("ade", tmp_path, tmp_path / "out")


def test_missing_published_file_is_named(tmp_path):
    (tmp_path / "ADE-NEG.txt").write_text("1 NEG fine.\n")
    with pytest.raises(ConfigError, match="no file DRUG-AE.rel"):
        convert("ade", tmp_path, tmp_path / "out")


def test_ddi_pairs_become_relation_rows_with_none_for_no_interaction(tmp_path):
    result = convert("ddi", FIXTURES / "ddi", tmp_path, dev_fraction=0.5, seed=0)
    rows = {(row["head"], row["tail"]): row for row in all_rows(tmp_path)}
    assert rows["Aspirin", "warfarin"]["relation"] == "effect"
    assert rows["Ketoconazole", "cisapride"]["relation"] == "mechanism"
    assert rows["Ibuprofen", "paracetamol"]["relation"] == "None"
    assert rows["Aspirin", "warfarin"]["text"] == "Aspirin increases the effect of warfarin."
    assert result["rows"] == {"train": 2, "dev": 2}


def test_ddi_leaves_out_discontinuous_mentions_and_counts_them(tmp_path):
    result = convert("ddi", FIXTURES / "ddi", tmp_path, dev_fraction=0.5, seed=0)
    assert result["skipped_pairs"] == 2  # "Beta blockers" in each of the two documents
    assert all(row["head"] != "Beta blockers" for row in all_rows(tmp_path))


def test_ddi_rows_read_as_relation_extraction(tmp_path):
    convert("ddi", FIXTURES / "ddi", tmp_path, dev_fraction=0.5, seed=0)
    data = read_task_examples(str(tmp_path / "train.jsonl"), "relation-extraction", "train")
    assert len(data.examples) == 2


def test_ddi_names_a_file_that_is_not_xml(tmp_path):
    (tmp_path / "broken.xml").write_text("<document><sentence")
    with pytest.raises(ConfigError, match=r"broken.xml: not valid XML"):
        convert("ddi", tmp_path, tmp_path / "out")


def test_chemprot_labels_each_sentence_with_its_relations_groups(tmp_path):
    convert("chemprot", FIXTURES / "chemprot", tmp_path)
    train = {row["text"]: row["labels"] for row in read_rows(tmp_path / "train.jsonl")}
    assert train == {
        "Aspirin inhibits COX-1.": ["DOWNREGULATOR"],
        "Aspirin inhibits COX-1 in platelets.": ["DOWNREGULATOR"],
        "Salicylate is a product of aspirin hydrolysis by esterase.": ["PRODUCT-OF"],
    }
    dev = read_rows(tmp_path / "dev.jsonl")
    assert [row["labels"] for row in dev] == [["AGONIST", "ANTAGONIST"]]


def test_chemprot_counts_a_relation_whose_entities_are_in_two_sentences(tmp_path):
    result = convert("chemprot", FIXTURES / "chemprot", tmp_path)
    assert result["skipped_relations"] == 1  # CPR:3 from the title's Aspirin to the abstract's COX-1


def test_chemprot_uses_the_five_label_names_of_our_multilabel_set():
    assert sorted(CHEMPROT_GROUP_LABELS.values()) == [
        "ACTIVATOR",
        "AGONIST",
        "ANTAGONIST",
        "DOWNREGULATOR",
        "PRODUCT-OF",
    ]


def test_chemprot_rows_read_as_multi_label(tmp_path):
    convert("chemprot", FIXTURES / "chemprot", tmp_path)
    data = read_task_examples(str(tmp_path / "train.jsonl"), "multi-label", "train")
    assert len(data.examples) == 3


def test_sentence_split_keeps_offsets_into_the_whole_text():
    text = "First one. Second (2) here! third stays."
    spans = split_sentences(text, 100)
    assert [sentence for _, _, sentence in spans] == ["First one.", "Second (2) here! third stays."]
    assert all(text[begin - 100 : end - 100].strip() == sentence for begin, end, sentence in spans)


def test_document_split_draws_at_least_one_dev_document():
    assert len(split_documents(["a", "b", "c"], 0.01, seed=0)) == 1


def test_document_split_rejects_a_fraction_outside_zero_and_one():
    with pytest.raises(ConfigError, match="--dev-fraction"):
        split_documents(["a"], 1.0, seed=0)


def medmnist_arrays(images_dtype=np.uint8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"{split}_{kind}": array
        for split, n in (("train", 4), ("val", 2))
        for kind, array in (
            ("images", rng.integers(0, 255, (n, 28, 28)).astype(images_dtype)),
            ("labels", rng.integers(0, 2, (n, 1))),
        )
    }


def test_medmnist_npz_is_checked_and_copied(tmp_path):
    source = tmp_path / "pneumoniamnist.npz"
    np.savez(source, **medmnist_arrays())
    result = convert("medmnist", source, tmp_path / "out")
    assert result["rows"] == {"train": 4, "val": 2}
    assert len(read_image_examples(str(tmp_path / "out" / "pneumoniamnist.npz"), "train")) == 4


def test_medmnist_names_the_array_with_the_wrong_dtype(tmp_path):
    source = tmp_path / "bad.npz"
    np.savez(source, **medmnist_arrays(images_dtype=np.float32))
    with pytest.raises(ConfigError, match="'train_images' must be uint8"):
        convert("medmnist", source, tmp_path / "out")


def test_medmnist_names_a_missing_array(tmp_path):
    arrays = medmnist_arrays()
    del arrays["val_labels"]
    source = tmp_path / "bad.npz"
    np.savez(source, **arrays)
    with pytest.raises(ConfigError, match="missing array 'val_labels'"):
        convert("medmnist", source, tmp_path / "out")


def test_medmnist_image_folder_becomes_an_npz(tmp_path):
    from PIL import Image

    for split, label in (("train", 0), ("train", 1), ("val", 1)):
        folder = tmp_path / "xrays" / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((28, 28), 40 * (label + 1), dtype=np.uint8)).save(folder / "a.png")
    result = convert("medmnist", tmp_path / "xrays", tmp_path / "out")
    assert result["rows"] == {"train": 2, "val": 1}
    with np.load(tmp_path / "out" / "xrays.npz") as npz:
        assert npz["train_labels"].ravel().tolist() == [0, 1]
        assert npz["train_images"].shape == (2, 28, 28)


def test_cli_converts_and_reports_the_rows(tmp_path, capsys):
    code = main(
        ["data", "convert", "chemprot", str(FIXTURES / "chemprot"), "--output", str(tmp_path), "--json"]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["rows"] == {"train": 3, "dev": 1}


def test_cli_error_names_the_missing_source(tmp_path, capsys):
    code = main(["data", "convert", "ddi", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
