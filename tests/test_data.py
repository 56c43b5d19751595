"""QA schema, `data check`, and the shipped data's counts."""
from __future__ import annotations

import json

import pytest

from pipeline.config import REPO_ROOT
from pipeline.data.records import DataError, check, load_split, read_records


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


GOOD = {"id": "a-1", "question": "Who made Adam?", "answer": "Kingma and Ba.", "doc": "adam.md",
        "facts": [["Kingma"]]}
NONE = {"id": "u-1", "question": "What is the capital of Mars?", "answer": None, "doc": None, "facts": []}


@pytest.fixture
def folders(tmp_path):
    docs, qa = tmp_path / "docs", tmp_path / "qa"
    docs.mkdir()
    qa.mkdir()
    (docs / "adam.md").write_text("# Adam\n\nAdam was proposed by Kingma and Ba.\n")
    return docs, qa


def test_shipped_data_passes_and_meets_the_counts():
    report = check(REPO_ROOT / "data/qa", REPO_ROOT / "data/docs")
    assert report["train"]["records"] >= 800 and report["eval"]["records"] >= 200
    assert report["train"]["unanswerable_share"] >= 0.15 and report["eval"]["unanswerable_share"] >= 0.15
    assert report["train"]["follow_ups"] > 0 and report["eval"]["follow_ups"] > 0
    assert len(report["eval"]["documents_unseen_in_train"]) >= 5
    docs = list((REPO_ROOT / "data/docs").glob("*.md"))
    assert len(docs) >= 40
    for doc in docs:
        text = doc.read_text()
        assert text.startswith("# ") and 300 <= len(text.split()) <= 1500, doc.name


def test_malformed_lines_are_reported_with_file_and_line(folders):
    docs, qa = folders
    _write(qa / "train.jsonl", [GOOD, "{not json", {**GOOD, "id": "a-2", "facts": "Kingma"},
                                {"id": "a-3", "question": "q"}, {**NONE, "id": "u-2", "facts": [["x"]]}])
    records, problems = read_records(qa / "train.jsonl")
    assert [r.id for r in records] == ["a-1"]
    assert problems[0].endswith("train.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)")
    assert "train.jsonl:3: 'facts' must be a list of non-empty lists" in problems[1]
    assert "train.jsonl:4: missing field(s): answer, doc, facts" in problems[2]
    assert "train.jsonl:5: an unanswerable record" in problems[3]
    with pytest.raises(DataError, match="train.jsonl:2"):
        load_split(qa, "train")


def test_duplicates_split_overlap_and_fact_checks(folders):
    docs, qa = folders
    _write(qa / "train.jsonl", [GOOD, GOOD, NONE])
    _write(qa / "eval.jsonl", [{**GOOD, "id": "e-1"}, {**NONE, "id": "u-1", "question": "Other?"},
                               {**GOOD, "id": "e-2", "question": "Other one?", "facts": [["Hinton"]]},
                               {**GOOD, "id": "e-3", "question": "Third?", "doc": "missing.md"}])
    with pytest.raises(DataError) as err:
        check(qa, docs)
    message = str(err.value)
    assert "duplicate id 'a-1' (2 times)" in message
    assert "id 'u-1' is in both train and eval" in message
    assert "eval question 'Who made Adam?' (e-1) also appears in train" in message
    assert "id e-2: the answer does not contain the fact ['Hinton']" in message
    assert "document 'missing.md' not found" in message


def test_clean_folder_passes_with_counts(folders):
    docs, qa = folders
    _write(qa / "train.jsonl", [GOOD, NONE])
    _write(qa / "eval.jsonl", [{**GOOD, "id": "e-1", "question": "Which pair proposed Adam?",
                                "history": [["Tell me about Adam", "An optimiser."]]}])
    report = check(qa, docs)
    assert report["train"] == {"records": 2, "unanswerable": 1, "unanswerable_share": 0.5,
                               "follow_ups": 0, "documents": 1}
    assert report["eval"]["follow_ups"] == 1


def test_cli_data_check(capsys):
    from pipeline.cli import main

    assert main(["data", "check", "--profile", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["records"] >= 800


def test_the_unseen_documents_check_set_is_sound():
    """data/ood: every answerable question's facts are in its document, its documents are ones
    no stage reads, and its questions are none of data/qa's."""
    from pipeline.data.normalize import contains_fact

    records, errors = read_records(REPO_ROOT / "data/ood/qa.jsonl")
    assert not errors and len(records) == 45 and sum(r.answerable for r in records) == 34
    for record in (r for r in records if r.answerable):
        text = (REPO_ROOT / "data/ood/docs" / record.doc).read_text()
        assert all(contains_fact(text, fact) for fact in record.facts), record.id
    assert not {d.name for d in (REPO_ROOT / "data/ood/docs").iterdir()} & {d.name for d in (REPO_ROOT / "data/docs").iterdir()}
    trained = {r.question for split in ("train", "eval") for r in load_split(REPO_ROOT / "data/qa", split)}
    assert not trained & {r.question for r in records}
