"""`tunesmith audit`: what the model will actually be trained on — rendered examples with trained tokens marked, and
the data summary every training run also logs."""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.config import field
from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import UserError
from tunesmith.recipes.sft.config import SFTConfig
from tunesmith.recipes.sft.run import prepare_data, training_tokenizer

START, END = "⟦", "⟧"  # trained spans are shown between these marks


def mark_trained(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode ``input_ids`` with every run of trained tokens wrapped in ⟦ ⟧."""
    out, run, trained = [], [], None
    for tok_id, label in zip(input_ids, labels):
        is_trained = label != IGNORE
        if trained is not None and is_trained != trained:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{START}{text}{END}" if trained else text)
            run = []
        run.append(tok_id)
        trained = is_trained
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"{START}{text}{END}" if trained else text)
    return "".join(out)


@dataclass
class AuditArgs:
    """Audit"""

    show: int = field(3, "Examples to show.")

    def __post_init__(self):
        if self.show < 0:
            raise UserError(f"field 'show' must be >= 0, got {self.show}")


class AuditConfig(SFTConfig):
    """``tunesmith sft``'s keys (the same config file) plus ``show``."""

    PARTS = (("audit", AuditArgs),) + SFTConfig.PARTS


def cli(argv: list[str]) -> int:
    from tunesmith.config import parse_cli

    cfg = parse_cli(AuditConfig, argv, "audit", "Show rendered training examples with trained tokens marked "
                    f"{START}like this{END}, and a summary of the data.")
    if cfg is None:
        return 0
    show = cfg.audit.show
    tokenizer = training_tokenizer(cfg)  # the revision and chat_template training uses
    _, train_set, summary, _, eval_summaries = prepare_data(cfg, tokenizer)
    for i, ex in enumerate(train_set[:show]):
        print(f"--- example {i} ({len(ex['input_ids'])} tokens)")
        print(mark_trained(tokenizer, ex["input_ids"], ex["labels"]))
    print("---")
    for line in summary.lines() + [line for s in eval_summaries for line in s.lines()]:
        print(line)
    return 0
