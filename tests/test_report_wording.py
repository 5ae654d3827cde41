"""The report and plan speak plainly (issue 23.7): each plot says which direction is better, one seed draws no error
bars, loss legends keep at most 4 entries a panel, mean and median markers are named, the report opens with each
run's settings, plan labels QLoRA weights by their real bytes per parameter and says why the strategies differ on
one GPU."""
import json
import warnings

import pytest
import yaml

from tunesmith.demo.run import BETTER, METRICS, summary_figure
from tunesmith.evaluation import report as R


def fake_run(root, name, steps=6, **cfg):
    d = root / name
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 3.0 / s, "eval_train_loss": 2.5 / s, "eval_eval_loss": 2.8 / s})
                    + "\n")
    if cfg:
        (d / "tunesmith.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_loss_legends_keep_at_most_four_entries_and_seeds_share_one(tmp_path):
    names = [f"{v}-seed{s}" for v in ("sft", "neftune", "spin1", "spin2", "spin3", "dpo") for s in range(3)]
    runs = [R.load_run(str(fake_run(tmp_path, n))) for n in names]
    fig = R.loss_figure(runs)
    axes = fig.axes
    assert len(axes) == 2 * 3  # 6 variants: 2 rows of panels, 3 curves each
    for ax in axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert 1 <= len(labels) <= 4 and len(set(labels)) == len(labels)
        assert not any("seed" in label for label in labels)  # the 3 seeds of a variant: one entry, one colour
    titles = [ax.get_title() for ax in axes[:3]]
    assert "lower is better" in titles[2] and "noise" in titles[0]
    R.pyplot().close(fig)


def test_summary_plot_says_what_is_better_and_draws_no_zero_width_error_bars():
    from matplotlib.container import ErrorbarContainer

    assert {key for key, *_ in METRICS} == set(BETTER)
    one_seed = {"sft": [{"heldout_loss": 0.8, "win_rate": None}], "neftune": [{"heldout_loss": 0.7, "win_rate": 68.0}]}
    fig = summary_figure(one_seed)
    ax = fig.axes[0]
    assert "lower is better" in ax.get_title()
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]  # before: yerr=0 on every bar
    R.pyplot().close(fig)
    seeds = {"sft": [{"heldout_loss": 0.8}, {"heldout_loss": 0.9}], "neftune": [{"heldout_loss": 0.7},
                                                                                {"heldout_loss": 0.6}]}
    fig = summary_figure(seeds)
    assert [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    R.pyplot().close(fig)


def test_overlap_plot_names_mean_and_median_without_deprecations():
    sets = [("a / gen", {"overlap": {"rouge_l": [0.1, 0.5, 0.9], "bleu": [10.0, 20.0, 50.0]}}),
            ("b / gen", {"overlap": {"rouge_l": [0.2, 0.3], "bleu": [5.0, 6.0]}})]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib 3.10+ deprecates boxplot(vert=...)
        fig = R.overlap_figure(sets)
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["median", "mean"]
        assert "higher: closer to the reference" in ax.get_title()
    R.pyplot().close(fig)


def test_report_opens_with_each_runs_settings(tmp_path):
    a = fake_run(tmp_path, "lora-neft", model_name_or_path="m", dataset="data/train.jsonl", use_peft=True, lora_r=16,
                 neftune_noise_alpha=5.0, learning_rate=2e-3, num_train_epochs=2, max_steps=-1)
    b = fake_run(tmp_path, "full", model_name_or_path="m", dataset="data/train.jsonl", use_peft=False,
                 learning_rate=5e-5, num_train_epochs=3.0, max_steps=-1)
    c = fake_run(tmp_path, "unknown")  # no tunesmith.yaml: a row of dashes, not a failure
    R.run(R.ReportConfig(runs=[str(a), str(b), str(c)], output=str(tmp_path / "rep")))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.index("## Settings") < md.index("## Loss")
    assert "| lora-neft | sft | LoRA r 16 | 5 | 0.002 | 2 | `data/train.jsonl` |" in md
    assert "| full | sft | full | off | 5e-05 | 3 | `data/train.jsonl` |" in md
    assert "| unknown | – | – | – | – | – | – |" in md


@pytest.fixture(scope="module")
def qlora_plan(tmp_path_factory):
    from transformers import LlamaConfig

    from tunesmith.plan import plan

    d = tmp_path_factory.mktemp("llama")
    LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=8).save_pretrained(d)
    return plan({"model_name_or_path": str(d), "load_in_4bit": True, "lora_r": 16, "max_length": 256,
                 "per_device_train_batch_size": 2})


def test_plan_labels_qlora_weights_by_their_real_bytes(qlora_plan):
    from tunesmith.plan import NF4_BITS, format_plan

    kinds = {k["kind"]: k for k in qlora_plan["weights_by_kind"]}
    nf4 = kinds["4-bit NF4 linear weights (double quantization)"]
    assert nf4["bytes_per_param"] == pytest.approx(NF4_BITS[True] / 8) == pytest.approx(0.5159, abs=1e-4)
    assert sum(k["params"] for k in kinds.values()) == qlora_plan["params"]
    # the labels are the accounting: ddp's weights = the stored kinds + the 16-bit autocast copy of the adapters
    stored = sum(k["params"] * k["bytes_per_param"] for k in kinds.values())
    assert qlora_plan["strategies"]["ddp"]["weights"] == pytest.approx(stored + 2 * qlora_plan["trainable"])
    text = format_plan(qlora_plan, 24)
    assert "4-bit NF4 linear weights (double quantization) (0.516 B/param)" in text
    assert "weights 4 B/param" not in text  # before: the header called a QLoRA base "4 B/param"
    assert "On 1 GPU nothing is sharded" in text and "float32 master copy with the optimizer state" in text
