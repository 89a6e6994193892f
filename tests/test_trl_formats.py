"""TRL's dataset formats on import, with the one-row examples of TRL's tests/test_data_utils.py."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --- preference with tool calls -------------------------------------------------------------------

# TRL's example row (tests/test_data_utils.py, "Preference with tool calls"), as it is there.
GET_COLOR = {
    "type": "function",
    "function": {
        "description": "Gets the color.",
        "name": "get_color",
        "parameters": {"properties": {"what": {"description": "What to get the color of.", "type": "string"}},
                       "required": ["what"], "type": "object"},
        "return": {"description": "The color.", "type": "string"},
    },
}
TOOL_ROW = {
    "prompt": SKY,
    "chosen": [
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_color", "arguments": {"what": "sky"}}}]},
        {"role": "tool", "name": "get_color", "content": "blue"},
        {"role": "assistant", "content": "It is blue."},
    ],
    "rejected": [
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_color", "arguments": {"what": "tree"}}}]},
        {"role": "tool", "name": "get_color", "content": "green"},
        {"role": "assistant", "content": "It is green."},
    ],
    "tools": [GET_COLOR],
}


def stored_side(what: str, colour: str, answer: str) -> list[dict]:
    """A side of TOOL_ROW as the store keeps it: the call-only message gets empty content."""
    return [{"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "get_color", "arguments": {"what": what}}}]},
            {"role": "tool", "content": colour, "name": "get_color"},
            {"role": "assistant", "content": answer}]


STORED_TOOL_PAIR = {"prompt": SKY, "chosen": stored_side("sky", "blue", "It is blue."),
                    "rejected": stored_side("tree", "green", "It is green."), "tools": [GET_COLOR]}

# A chat template that renders tools, calls and results (the tiny model's own ignores tools).
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools:' }}{% for tool in tools %}"
    "{{ ' ' + tool.function.name + ' (' + tool.function.description + ')' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content }}"
    "{% for call in message.tool_calls or [] %}{{ '<call>' + call.function.name + call.function.arguments | tojson + '</call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tools_tokenizer():
    from studio.core.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def test_trl_name_for_a_tool_row_is_preference():
    assert datasets.trl_format(TOOL_ROW) == "preference"


def test_preference_with_tool_calls_is_imported_whole_and_round_trips(tmp_path, project):
    loaded = datasets.preview(write(tmp_path, [TOOL_ROW]))
    assert loaded.errors == [] and loaded.kind == "preference"
    assert loaded.rows == [STORED_TOOL_PAIR]
    plan = dict(loaded.column_plan())
    assert list(plan) == ["prompt", "chosen", "rejected", "tools"] and "chat template" in plan["tools"]

    dataset_id = datasets.import_file(project.db, write(tmp_path, [TOOL_ROW]))
    (pair,) = store.pairs(project.db, [dataset_id])
    assert {key: pair[key] for key in STORED_TOOL_PAIR} == STORED_TOOL_PAIR


def test_pairs_without_tools_store_none(tmp_path, project):
    dataset_id = datasets.import_file(project.db, write(tmp_path, [{"prompt": SKY, "chosen": BLUE, "rejected": GREEN}]))
    assert store.pairs(project.db, [dataset_id])[0]["tools"] is None


def test_tools_as_json_text_and_arguments_as_json_text_are_read_as_trl_reads_them(tmp_path):
    row = {**TOOL_ROW, "tools": json.dumps([GET_COLOR])}
    row["chosen"] = [{**row["chosen"][0], "tool_calls": [
        {"type": "function", "function": {"name": "get_color", "arguments": '{"what": "sky"}'}}]}, *row["chosen"][1:]]
    loaded = datasets.load_file(write(tmp_path, [row]))
    assert loaded.errors == [] and loaded.rows == [STORED_TOOL_PAIR]


def test_tool_rows_from_parquet_columns_of_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist([TOOL_ROW]), path)  # unifies the messages: absent keys become nulls
    loaded = datasets.load_file(path)
    assert loaded.errors == []
    (row,) = loaded.rows
    assert (row["chosen"], row["rejected"]) == (STORED_TOOL_PAIR["chosen"], STORED_TOOL_PAIR["rejected"])
    assert row["tools"][0]["function"]["name"] == "get_color"


def test_the_dpo_prompt_renders_the_tool_schemas_and_the_responses_the_calls(tmp_path, project):
    from studio.core import dpo

    dataset_id = datasets.import_file(project.db, write(tmp_path, [TOOL_ROW]))
    tokenizer = tools_tokenizer()
    (tokenized,), skipped = dpo.tokenize_pairs(dpo.Config(), tokenizer, store.pairs(project.db, [dataset_id]))
    assert skipped == 0
    assert tokenizer.decode(tokenized.prompt) == (
        "<|im_start|>system\nTools: get_color (Gets the color.)<|im_end|>\n"
        "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenized.chosen) == (
        '<call>get_color{"what": "sky"}</call><|im_end|>\n'
        "<|im_start|>tool\nblue<|im_end|>\n<|im_start|>assistant\nIt is blue.<|im_end|>\n")


def test_a_template_that_ignores_tools_stops_the_run_naming_pair_and_field(tmp_path, project):
    from studio.core import dpo
    from studio.core.generation import ChatTemplateError
    from studio.core.tiny import build_tokenizer

    dataset_id = datasets.import_file(project.db, write(tmp_path, [TOOL_ROW]))
    (pair,) = store.pairs(project.db, [dataset_id])
    with pytest.raises(ChatTemplateError) as caught:
        dpo.tokenize_pairs(dpo.Config(), build_tokenizer(), [pair])
    assert str(caught.value).startswith(f"dataset {dataset_id}, pair {pair['id']}, field 'tools': "
                                        "the model's chat template does not render function schemas")


def test_a_template_that_fails_on_a_message_is_named_not_a_traceback(project):
    from studio.core import dpo
    from studio.core.generation import ChatTemplateError

    tokenizer = tools_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('tool messages are not supported') }}"
    with pytest.raises(ChatTemplateError, match=r"^labelled comparison 7: the model's chat template cannot render it "
                                                r"\(TemplateError: tool messages are not supported\)"):
        dpo.tokenize_pairs(dpo.Config(), tokenizer, [{**STORED_TOOL_PAIR, "comparison_id": 7}])


def with_message(side: str, index: int, message) -> dict:
    row = json.loads(json.dumps(TOOL_ROW))
    row[side][index] = message
    return row


@pytest.mark.parametrize("row, field, message", [
    ({**TOOL_ROW, "tools": GET_COLOR}, "tools", "expected a list of function schemas, got an object"),
    ({**TOOL_ROW, "tools": "[{not json"}, "tools", "the value is not valid JSON"),
    ({**TOOL_ROW, "tools": [{"name": "get_color"}]}, "tools", "tool 1 is not a function schema"),
    (with_message("chosen", 0, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_color", "arguments": '{"what": sky}'}}]}),
     "chosen", "message 1 tool call 1 (get_color): 'arguments' is not valid JSON"),
    (with_message("chosen", 0, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_color", "arguments": '["sky"]'}}]}),
     "chosen", "message 1 tool call 1 (get_color): 'arguments' must be an object of named values, got a list"),
    (with_message("rejected", 0, {"role": "assistant", "tool_calls": {"name": "get_color"}}),
     "rejected", "message 1 'tool_calls' must be a non-empty list of calls, got an object"),
    (with_message("rejected", 0, {"role": "assistant", "tool_calls": [{"name": "get_color"}]}),
     "rejected", "message 1 tool call 1 is not a function call"),
    (with_message("chosen", 1, {"role": "tool", "name": "get_color"}),
     "chosen", "message 2 has no 'content' (a tool message holds the call's result)"),
    (with_message("chosen", 1, {"role": "user", "content": "hi", "tool_calls": TOOL_ROW["chosen"][0]["tool_calls"]}),
     "chosen", "message 2 is a 'user' message with 'tool_calls'; only an assistant calls functions"),
])
def test_hostile_tool_rows_name_file_row_and_field(tmp_path, row, field, message):
    loaded = datasets.load_file(write(tmp_path, [{"prompt": SKY, "chosen": BLUE, "rejected": GREEN}, row]))
    (error,) = loaded.errors
    assert (error.file, error.row, error.field) == ("data.jsonl", 2, field)
    assert error.message.startswith(message)


def test_huge_tool_schemas_and_calls_are_refused_by_size(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_FIELD_CHARS", 2000)
    big_schema = json.loads(json.dumps(GET_COLOR))
    big_schema["function"]["description"] = "x" * 2000
    big_call = with_message("chosen", 0, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_color", "arguments": {"what": "y" * 2000}}}]})
    loaded = datasets.load_file(write(tmp_path, [{**TOOL_ROW, "tools": [big_schema]}, big_call]))
    assert [(e.row, e.field) for e in loaded.errors] == [(1, "tools"), (2, "chosen")]
    assert all("the limit is 2,000" in e.message for e in loaded.errors)


def test_prompts_with_tools_are_refused_with_what_to_do(tmp_path):
    loaded = datasets.load_file(write(tmp_path, [{"prompt": SKY, "tools": [GET_COLOR]}]))
    (error,) = loaded.errors
    assert error.field == "tools" and "preference pairs only" in error.message and "drop the column" in error.message


def test_a_dpo_launch_on_a_template_without_tools_is_refused_naming_the_pairs(tmp_path, project):
    from studio.core import runs

    dataset_id = datasets.import_file(project.db, write(tmp_path, [TOOL_ROW] * 5))
    first = store.pairs(project.db, [dataset_id])[0]["id"]
    with pytest.raises(runs.ConfigError) as caught:
        runs.create_run(project.db, runs.make_config("dpo", {"max_steps": 1}))
    lines = str(caught.value).splitlines()
    assert lines[0] == "Cannot start this run:"
    assert lines[1].startswith(f"- dataset {dataset_id}, pair {first}, field 'tools': the model's chat template "
                               "does not render function schemas")
    assert lines[4:] == ["- ... and 2 more pairs like these"]  # three named, the rest counted


@pytest.fixture
def tools_project(tmp_path, tiny_model_dir):
    """A project on the tiny model with TOOLS_TEMPLATE as its chat template, and the TRL tool row imported."""
    import shutil

    folder = tmp_path / "tools-model"
    shutil.copytree(tiny_model_dir, folder)
    tools_tokenizer().save_pretrained(folder)
    with store.Project.create(tmp_path / "p", base_model={"kind": "folder", "path": str(folder)}) as project:
        datasets.import_file(project.db, write(tmp_path, [TOOL_ROW]))
        yield project


def test_a_dpo_run_on_a_template_with_tools_trains_on_the_tool_pair(tools_project):
    from studio.core import runs

    project = tools_project
    run_id = runs.create_run(project.db, runs.make_config("dpo", {"max_steps": 1, "eval_max_new_tokens": 2}))
    assert runs.execute(project.path, run_id) == "completed"
    assert store.run_metrics(project.db, run_id)["rewards/chosen"][0] == [1]  # the tool pair trained a step


def test_handoff_to_trl_keeps_each_pairs_tools_and_openrlhf_is_refused(tools_project, tmp_path):
    from studio.core import handoff, runs

    project = tools_project
    run_id = runs.create_run(project.db, runs.make_config("dpo", {"max_steps": 1}))
    script = handoff.export_job(project.path, run_id, "trl", tmp_path / "trl-dpo")
    (row,) = [json.loads(line) for line in (script.parent / "data" / "train.jsonl").read_text().splitlines()]
    assert json.loads(row["tools"]) == [GET_COLOR] and row["chosen"] == STORED_TOOL_PAIR["chosen"]
    with pytest.raises(handoff.HandoffError, match="^OpenRLHF 0.11's preference data has no tools"):
        handoff.export_job(project.path, run_id, "openrlhf", tmp_path / "openrlhf-dpo")


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=1, max_size=30).filter(str.strip),
       arguments=st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=4),
       as_text=st.booleans(), result=st.text(min_size=1, max_size=40).filter(str.strip))
def test_any_well_formed_call_round_trips_through_the_store(tmp_path, name, arguments, as_text, result):
    """Whatever the function's name, argument values (nested, unicode) and result text, and whether the
    arguments come as an object or as JSON text, the stored pair holds the call as an object."""
    from sqlite_utils import Database

    call = {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments) if as_text else arguments}}
    row = {"prompt": SKY, "chosen": [{"role": "assistant", "tool_calls": [call]},
                                     {"role": "tool", "name": name, "content": result}, *BLUE],
           "rejected": GREEN, "tools": [{"type": "function", "function": {"name": name}}]}
    loaded = datasets.load_file(write(tmp_path, [row]))
    assert loaded.errors == []
    db = Database(memory=True)
    store.migrations.apply(db)
    store.add_dataset(db, "tools", "preference", loaded.rows)
    (pair,) = store.pairs(db)
    assert pair["chosen"] == [{"role": "assistant", "content": "",
                               "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]},
                              {"role": "tool", "content": result, "name": name}, *BLUE]
    assert pair["tools"] == row["tools"] and datasets.has_tool_calls(pair)
