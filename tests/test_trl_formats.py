"""TRL's dataset formats on import, with the one-row examples of TRL's tests/test_data_utils.py."""

import json

import pytest

from studio.core import datasets, store

SKY = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]
HARMONY_PROMPT = [{"role": "system", "content": "Respond in a friendly manner."}, *SKY]
THINKING_BLUE = [{"role": "assistant", "thinking": "The user asks the color of the sky...", "content": "It is blue."}]


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("row, expected", [
    ({"messages": [*SKY, *BLUE]}, "language modeling"),
    ({"text": "The sky is blue."}, "language modeling"),
    ({"prompt": SKY}, "prompt-only"),
    ({"prompt": SKY, "completion": BLUE}, "prompt-completion"),
    ({"prompt": SKY, "chosen": BLUE, "rejected": GREEN}, "preference"),
    ({"chosen": [*SKY, *BLUE], "rejected": [*SKY, *GREEN]}, "preference"),
    ({"prompt": SKY, "completion": BLUE, "label": True}, "unpaired preference"),
    ({"prompt": "The sky is", "completion": " blue.", "label": True}, "unpaired preference"),
])
def test_each_trl_format_is_named(row, expected):
    assert datasets.trl_format(row) == expected


def test_unpaired_preference_becomes_pairs_of_opposite_labels_and_keeps_every_row(tmp_path, project):
    rows = [
        {"prompt": SKY, "completion": BLUE, "label": True},
        {"prompt": SKY, "completion": GREEN, "label": False},
        {"prompt": SKY, "completion": [{"role": "assistant", "content": "Blue, mostly."}], "label": True},  # no partner
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": "The sky is", "completion": " green.", "label": False},
        {"prompt": "Grass is", "completion": " red.", "label": False},  # no partner
    ]
    loaded = datasets.preview(write(tmp_path, rows))
    assert loaded.errors == [] and loaded.kind == "preference" and loaded.trl_format == "unpaired preference"
    assert loaded.rows == [{"prompt": SKY, "chosen": BLUE, "rejected": GREEN},
                           {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    assert loaded.unpaired == 2
    assert loaded.summary().startswith("6 unpaired preference rows: 2 preference pairs")
    assert "2 rows left unpaired" in loaded.summary()
    assert [column for column, _ in loaded.column_plan()] == ["prompt", "completion", "label"]

    dataset_id = datasets.import_file(project.db, write(tmp_path, rows))
    assert [p["chosen"] for p in store.pairs(project.db, [dataset_id])] == [BLUE, " blue."]
    kept = store.feedback(project.db)
    assert [(r["completion"], r["label"]) for r in kept] == [(r["completion"], r["label"]) for r in rows]


def test_prompt_completion_keeps_the_completion_as_a_reference_answer(tmp_path, project):
    rows = [{"prompt": SKY, "completion": BLUE, "extra": 1}, {"prompt": HARMONY_PROMPT, "completion": THINKING_BLUE}]
    loaded = datasets.preview(write(tmp_path, rows))
    assert loaded.kind == "prompts" and loaded.trl_format == "prompt-completion"
    assert loaded.rows[1] == {"prompt": HARMONY_PROMPT, "reference": THINKING_BLUE}  # thinking kept
    plan = dict(loaded.column_plan())
    assert plan["extra"] == "ignored" and "reference answer" in plan["completion"]
    datasets.import_file(project.db, write(tmp_path, rows))
    assert list(store.reference_answers(project.db).values()) == [BLUE, THINKING_BLUE]


def test_thinking_fields_are_kept_in_preference_pairs(tmp_path):
    row = {"prompt": HARMONY_PROMPT, "chosen": THINKING_BLUE,
           "rejected": [{"role": "assistant", "thinking": "The user asks the color of the tree...",
                         "content": "It is green."}]}
    loaded = datasets.load_file(write(tmp_path, [row]))
    assert loaded.errors == [] and loaded.rows == [row]


@pytest.mark.parametrize("row", [{"messages": [*SKY, *BLUE]}, {"text": "The sky is blue."}])
def test_language_modeling_rows_are_named_with_what_the_studio_can_do(tmp_path, row):
    loaded = datasets.load_file(write(tmp_path, [row]))
    (error,) = loaded.errors
    assert "language-modeling row" in error.message and "SFT" in error.message and "import it as prompts" in error.message
    csv_path = tmp_path / "lm.csv"
    csv_path.write_text("text\nThe sky is blue.\n")
    (error,) = datasets.load_file(csv_path).errors
    assert "language-modeling file" in error.message


def test_unpaired_preference_in_csv_reads_text_labels(tmp_path):
    path = tmp_path / "feedback.csv"
    path.write_text("prompt,completion,label\nThe sky is, blue.,true\nThe sky is, green.,False\n")
    loaded = datasets.load_file(path)
    assert loaded.errors == [] and loaded.rows == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    path.write_text("prompt,completion,label\nThe sky is, blue.,maybe\n")
    (error,) = datasets.load_file(path).errors
    assert error.field == "label" and error.row == 1
