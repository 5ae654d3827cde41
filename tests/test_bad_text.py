"""Text that JSON can spell but that is not text: lone surrogate escapes, in data and generation files."""
import json

import pytest

from tunesmith.data.source import read_records
from tunesmith.errors import UserError
from tunesmith.evaluation.genfile import read_generations


def test_lone_surrogates_in_jsonl_name_line_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n'
                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x \\uDC00"}]}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: field 'messages\[1\].content': lone surrogate escape \\udc00"):
        read_records(f)


def test_lone_surrogates_in_a_json_array_and_in_keys(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "a", "\\ud83d": "b"}]')
    with pytest.raises(UserError, match=r"d.json: row 1: field '\\ud83d': lone surrogate escape \\ud83d"):
        read_records(f)


def test_surrogate_pairs_are_fine(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "smile \\ud83d\\ude00", "output": "b"}\n')
    assert read_records(f)[0].data["instruction"] == "smile \U0001F600"


def test_generation_files_are_checked_too(tmp_path):
    f = tmp_path / "g.jsonl"
    bad = '{"instruction": "q2", "output": "\\ud800"}\n'
    f.write_text(json.dumps({"instruction": "q", "output": "ok"}) + "\n" + bad)
    with pytest.raises(UserError, match=r"g.jsonl:2: field 'output': lone surrogate escape"):
        read_generations(f)
