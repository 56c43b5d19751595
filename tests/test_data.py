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


def test_reader_split_is_checked_and_must_not_teach_an_eval_sentence(folders):
    docs, qa = folders
    (docs / "adam.md").write_text("# Adam\n\nAdam was proposed by Kingma and Ba. It keeps two moving averages.\n")
    _write(qa / "train.jsonl", [GOOD, NONE])
    _write(qa / "eval.jsonl", [{**GOOD, "id": "e-1", "question": "Which pair proposed Adam?"}])
    fresh = {"id": "r-1", "question": "How many averages does Adam keep?", "answer": "Two moving averages.",
             "doc": "adam.md", "facts": [["two moving averages"]]}
    _write(qa / "reader.jsonl", [fresh])
    assert check(qa, docs)["reader"]["records"] == 1
    taught = {**GOOD, "id": "r-2", "question": "Who is behind Adam?"}  # eval's sentence
    _write(qa / "reader.jsonl", [fresh, taught, {**GOOD, "id": "a-1", "question": "Again?"}])
    with pytest.raises(DataError) as err:
        check(qa, docs)
    message = str(err.value)
    assert "reader question r-2 is answered by the sentence eval question e-1 asks for" in message
    assert "r-1" not in message
    assert "id 'a-1' is in both train and reader" in message


def test_reader_stage_trains_on_the_reader_split_outside_dev(folders):
    from types import SimpleNamespace

    from pipeline.data.records import in_dev_split
    from pipeline.stages.reader import Config, training_questions

    docs, qa = folders
    rows = [{**GOOD, "id": f"a-{i}", "question": f"Who made Adam, {i}?"} for i in range(40)]
    _write(qa / "train.jsonl", rows)
    _write(qa / "reader.jsonl", [{**GOOD, "id": "r-1", "question": "Who wrote Adam?"}])
    cfg = SimpleNamespace(paths=SimpleNamespace(resolve=lambda key: {"qa": qa, "docs": docs}[key]),
                          dataset=SimpleNamespace(validation_share=0.1))
    dev, used = training_questions(cfg, Config())
    assert dev and all(in_dev_split(r.id, 0.1) for r in dev)
    assert {r.id for r in used} == {r["id"] for r in rows if not in_dev_split(r["id"], 0.1)} | {"r-1"}
    _, without = training_questions(cfg, Config(reader_questions=False))
    assert "r-1" not in {r.id for r in without} and len(without) == len(used) - 1
