"""Configs composed from parts: flat keys each owned by one part, old names as aliases, one NEFTune rule, grouped
--help, flat saved YAML; and errors.first_line (eval_mode and save_model_dir: tests/test_models.py)."""
import dataclasses
import logging

import pytest
import yaml
from transformers import TrainingArguments

from tunesmith.config import ALIASES, build_config, help_text, parse_cli, save_yaml
from tunesmith.errors import UserError, first_line
from tunesmith.recipes.classify.config import ClassifyConfig
from tunesmith.recipes.sft.config import SFTConfig
from tunesmith.recipes.spin.config import SPINConfig

RECIPES = [SFTConfig, SPINConfig, ClassifyConfig]
BASE = {"model_name_or_path": "m", "dataset": "d.jsonl", "output_dir": "o", "report_to": "none", "use_cpu": True}


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_every_training_argument_is_a_key_and_keys_have_one_owner(cls):
    owners = cls.owners()
    training = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert training <= set(owners)  # every TrainingArguments key still works
    declared = [f.name for _, part in cls.PARTS for f in dataclasses.fields(part) if f.init]
    # a key declared by two parts (SPIN's per-iteration learning_rate) goes to the first; none is lost
    assert set(declared) == set(owners)
    assert not set(ALIASES) & set(owners)  # no old name is also a live key


def test_spin_owns_its_per_iteration_values_and_builds_the_iteration_arguments(tmp_path):
    cfg = build_config(SPINConfig, dict(BASE, num_iterations=2, learning_rate=[1e-3, 2e-3], beta=0.5))
    assert SPINConfig.owners()["learning_rate"] == "spin" and cfg.spin.learning_rate == [1e-3, 2e-3]
    args = cfg.iteration_args(1, tmp_path)
    assert type(args) is TrainingArguments and args.learning_rate == 2e-3 and args.optim == "rmsprop"
    assert not isinstance(cfg, SFTConfig)


@pytest.mark.parametrize("key", ["packing", "train_on_prompt"])  # padding_free: pairs have a padding-free layout
def test_spin_rejects_what_it_cannot_do_in_one_line(key):
    with pytest.raises(UserError, match=f"field '{key}' is not supported by SPIN") as e:
        build_config(SPINConfig, dict(BASE, **{key: True}))
    assert "\n" not in str(e.value)


def test_spin_has_no_unused_keys():
    with pytest.raises(UserError, match="unknown key 'train_loss_eval_samples'"):
        build_config(SPINConfig, dict(BASE, train_loss_eval_samples=0))


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_one_neftune_rule(cls):
    assert build_config(cls, dict(BASE, neftune_noise_alpha=0)).neftune.neftune_noise_alpha == 0  # 0 = off, everywhere
    assert build_config(cls, dict(BASE, neftune_noise_alpha=5)).neftune.neftune_noise_alpha == 5
    with pytest.raises(UserError, match=r"neftune_noise_alpha' must be in \[0, 100\]"):
        build_config(cls, dict(BASE, neftune_noise_alpha=-1))
    with pytest.raises(UserError, match="uniform or gaussian"):
        build_config(cls, dict(BASE, neftune_noise_distribution="cauchy"))


def test_recipes_give_parts_their_own_defaults():
    sft, clf = build_config(SFTConfig, BASE), build_config(ClassifyConfig, BASE)
    assert (sft.lora.lora_r, sft.lora.lora_target_modules, sft.lora.use_peft) == (16, ["all-linear"], False)
    assert (clf.lora.lora_r, clf.lora.lora_target_modules, clf.lora.use_peft) == (4, None, True)
    assert clf.training.learning_rate == 1e-3 and sft.training.learning_rate == 5e-5


def test_old_names_warn_once_and_map_to_the_new_key(caplog):
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        cfg = build_config(ClassifyConfig, {"model_name_or_path": "m", "train_file": "t.jsonl",
                                            "validation_file": "v.jsonl", "test_file": "x.jsonl", "use_lora": False,
                                            "output_dir": "o"}, "c.yaml")
    data = cfg.data
    assert (data.dataset, data.eval_dataset, data.test_dataset, cfg.lora.use_peft) == ("t.jsonl", "v.jsonl", "x.jsonl",
                                                                                      False)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4 and all("\n" not in w for w in warned)
    assert "c.yaml: key 'train_file' is deprecated, use 'dataset'" in warned[0]
    with pytest.raises(UserError, match="both 'train_file' and 'dataset'"):
        build_config(ClassifyConfig, {"model_name_or_path": "m", "train_file": "t", "dataset": "t"})


def test_alias_applies_only_where_the_command_has_the_new_key():
    from tunesmith.evaluation.judge import JudgeConfig

    assert "model" in {f.name for f in dataclasses.fields(JudgeConfig)}  # judge's own 'model' stays its own key
    from tunesmith.generate import GenerateConfig

    cfg = build_config(GenerateConfig, {"model": "m", "prompts": "p", "output": "o", "split": "test"})
    assert (cfg.model_name_or_path, cfg.dataset_split) == ("m", "test")


def test_command_line_stays_flat_and_help_groups_keys_by_part(capsys):
    cfg = parse_cli(SFTConfig, ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--lora_r", "8",
                                "--seed", "3", "--report_to", "none"], "sft", "")
    assert (cfg.lora.lora_r, cfg.training.seed) == (8, 3)
    text = help_text(SFTConfig, "sft", "")
    for title in ("Model:", "Data:", "LoRA:", "NEFTune:", "SFT:", "Training (every transformers.TrainingArguments"):
        assert f"\n{title}" in text
    assert text.count("--lora_r ") == 1 and text.index("LoRA:") < text.index("--lora_r ") < text.index("NEFTune:")
    spin = help_text(SPINConfig, "spin", "")
    assert spin.count("--learning_rate ") == 1 and spin.index("--learning_rate ") < spin.index("Model:")


def test_keys_are_read_and_set_through_their_part_only():
    cfg = build_config(SPINConfig, dict(BASE, lora_r=8))
    assert cfg.lora.lora_r == 8 and cfg.spin.learning_rate == [5e-7] and cfg.training.learning_rate == 5e-5
    with pytest.raises(AttributeError, match=r"no attribute 'lora_r'; read cfg\.lora\.lora_r"):
        cfg.lora_r
    with pytest.raises(AttributeError, match=r"read cfg\.spin\.learning_rate"):  # SPIN's list, not the Trainer's
        cfg.learning_rate
    with pytest.raises(AttributeError, match=r"set cfg\.lora\.lora_r"):
        cfg.lora_r = 4  # would otherwise be a silent attribute nobody reads
    with pytest.raises(AttributeError, match="not 'anything'"):
        cfg.anything = 1
    assert cfg.lora.lora_r == 8 and not hasattr(cfg, "process_index") and cfg.training.process_index == 0
    assert cfg.to_dict()["lora_r"] == 8 and cfg.to_dict()["learning_rate"] == [5e-7]


def test_field_helper_documents_a_key_and_copies_list_defaults():
    from tunesmith.config import field

    @dataclasses.dataclass
    class Part:
        """Part"""

        names: list[str] = field(["a"], "Names.")
        hidden_key: int = field(1, "Not shown.", hidden=True)

    one, two = Part(), Part()
    one.names.append("b")
    assert two.names == ["a"]
    text = help_text(Part, "x", "")
    assert "--names (default: ['a'])\n      Names." in text and "hidden_key" not in text


def test_a_misspelt_yaml_key_names_file_and_line_and_suggests_the_key(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model_name_or_path: m\ndataset: d.jsonl\nlerning_rate: 1.0e-4\noutput_dir: o\n")
    with pytest.raises(UserError) as e:
        parse_cli(SFTConfig, ["--config", str(run)], "sft", "")
    assert str(e.value) == f"{run}:3: unknown key 'lerning_rate' (did you mean learning_rate?)"
    run.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\nlora_r: many\n")
    with pytest.raises(UserError, match=r"run\.yaml:4: field 'lora_r': expected an integer"):
        parse_cli(SFTConfig, ["--config", str(run)], "sft", "")
    with pytest.raises(UserError, match=r"^command line: field 'lora_r': expected an integer"):  # the flag's fault
        parse_cli(SFTConfig, ["--config", str(run), "--lora_r", "x"], "sft", "")


def test_an_unknown_key_with_control_characters_stays_one_escaped_line(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text('model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\n"bad\\nkey\\x1b[31m": 1\n')
    with pytest.raises(UserError) as e:
        parse_cli(SFTConfig, ["--config", str(run)], "sft", "")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert str(e.value).endswith(r":4: unknown key 'bad\nkey\x1b[31m'")
    with pytest.raises(UserError) as e:
        build_config(SFTConfig, dict(BASE, **{"x\ry": 1}))
    assert r"unknown key 'x\ry'" in str(e.value)


def test_list_flags_take_every_value_up_to_the_next_flag_as_trl_writes_them():
    argv = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--report_to", "none"]
    cfg = parse_cli(SFTConfig, argv + ["--lora_target_modules", "q_proj", "v_proj", "--lora_r", "8"], "sft", "")
    assert cfg.lora.lora_target_modules == ["q_proj", "v_proj"] and cfg.lora.lora_r == 8
    cfg = parse_cli(SFTConfig, argv + ["--lora_target_modules", "q_proj,v_proj"], "sft", "")  # the old spelling
    assert cfg.lora.lora_target_modules == ["q_proj", "v_proj"]
    cfg = parse_cli(SPINConfig, argv + ["--num_iterations", "2", "--beta", "0.1", "5.0"], "spin", "")
    assert cfg.spin.beta == [0.1, 5.0]
    with pytest.raises(UserError, match="unexpected argument 'v_proj'"):  # a scalar key takes one value
        parse_cli(SFTConfig, argv + ["--lora_r", "8", "v_proj"], "sft", "")


def test_no_key_sets_a_boolean_false():
    argv = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--report_to", "none"]
    cfg = parse_cli(SFTConfig, argv + ["--packing", "--no_train_on_prompt", "--no-use_peft"], "sft", "")
    assert cfg.data.packing is True and cfg.data.train_on_prompt is False and cfg.lora.use_peft is False
    cfg = parse_cli(ClassifyConfig, argv + ["--no_use_peft", "--no_load_best_model_at_end"], "classify", "")
    assert cfg.lora.use_peft is False and cfg.training.load_best_model_at_end is False
    with pytest.raises(UserError, match="--no_packing takes no value"):
        parse_cli(SFTConfig, argv + ["--no_packing", "true"], "sft", "")
    with pytest.raises(UserError, match="unknown flag --no_lora_r"):  # not a boolean
        parse_cli(SFTConfig, argv + ["--no_lora_r"], "sft", "")


def test_the_committed_reference_and_docs_are_current():
    """config_reference.json (what --help prints) and docs/configuration.md match the config parts of today; after
    changing a key, a default, a help text or a command: python scripts/gen_config_reference.py"""
    import json

    import transformers

    from tunesmith import reference

    committed = json.loads(reference.REFERENCE.read_text(encoding="utf-8"))
    assert committed.get("transformers") == transformers.__version__, "generated with another transformers version"
    fresh = reference.build()
    stale = sorted(n for n in fresh["commands"].keys() | committed["commands"].keys()
                   if fresh["commands"].get(n) != committed["commands"].get(n))
    assert not stale, f"stale reference for {stale}: run python scripts/gen_config_reference.py"
    assert reference.REFERENCE.read_text(encoding="utf-8") == reference.dumps(fresh), \
        "config_reference.json is not as the script writes it: run python scripts/gen_config_reference.py"
    assert reference.DOCS.read_text(encoding="utf-8") == reference.markdown(fresh), \
        "docs/configuration.md is stale: run python scripts/gen_config_reference.py"


def test_fast_help_is_what_the_command_itself_prints(capsys):
    from tunesmith import reference
    from tunesmith.recipes.sft import run as sft_run

    assert sft_run.cli(["--help"]) == 0
    own = capsys.readouterr().out
    assert own == reference.command_help("sft") and "--learning_rate (default: 5e-05)" in own
    assert "\nModel:\n" in own and "Old key names" in own


def test_saved_yaml_is_flat_and_builds_the_same_config(tmp_path):
    cfg = build_config(SPINConfig, dict(BASE, num_iterations=2, beta=[0.1, 5.0], lora_r=8, use_peft=True))
    save_yaml(cfg, tmp_path / "t.yaml")
    data = yaml.safe_load((tmp_path / "t.yaml").read_text())
    assert data["beta"] == [0.1, 5.0] and data["learning_rate"] == [5e-7, 5e-7] and data["lora_r"] == 8
    assert data["optim"] == "rmsprop"
    assert not any(isinstance(v, dict) and k in ("spin", "lora") for k, v in data.items())
    again = build_config(SPINConfig, data)
    assert again.to_dict() == cfg.to_dict()


def test_classify_rejects_4bit_and_merge_audit_parse_through_config(tmp_path, capsys):
    with pytest.raises(UserError, match="load_in_4bit"):
        build_config(ClassifyConfig, dict(BASE, load_in_4bit=True))
    from tunesmith.cli import main

    assert main(["audit", "--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--show", "x"]) == 2
    assert "field 'show': expected an integer" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(tmp_path)]) == 2
    assert "--adapter and --output are required" in capsys.readouterr().err


def test_first_line():
    assert first_line(ValueError("bad thing\n  at line 3\n")) == "bad thing"
    assert first_line(KeyError()) == "KeyError"
