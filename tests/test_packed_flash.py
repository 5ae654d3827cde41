"""Issue 18.8: packed rows under FlashAttention, checked on CPU by what reaches the attention call.

transformers sends FlashAttention to its variable-length kernel from position ids only when the batch has one row
(``_is_packed_sequence``); with more rows it runs plain causal attention over each whole row. A recording attention
function, registered through transformers' AttentionInterface under a flash name (so transformers and tunesmith
treat the model as a FlashAttention one), takes exactly the decision ``_flash_attention_forward`` takes and computes
each sequence it would hand the kernel with SDPA. Packed examples must then give the log-probs they give alone."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from tunesmith.data.collate import Collator, pack
from tunesmith.data.tokenize import IGNORE
from tunesmith.scoring import causal_lm_loss, token_logprobs

CALLS = []
NAME = "flash_emulation_for_tests"


def varlen_emulation(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """FlashAttention's dispatch (transformers' _flash_attention_forward, no padding mask): varlen over the segments
    of the position ids when ``_is_packed_sequence``, else one causal sequence per row."""
    b, h, t, d = query.shape
    key = key.repeat_interleave(h // key.shape[1], dim=1)
    value = value.repeat_interleave(h // value.shape[1], dim=1)
    pos = kwargs.get("position_ids")
    packed = attention_mask is None and pos is not None and bool(_is_packed_sequence(pos, b))
    CALLS.append({"rows": b, "mask": attention_mask is not None, "varlen": packed})
    assert attention_mask is None, "this test sends packed batches only"
    if packed:
        (cu, _), _ = prepare_fa_kwargs_from_position_ids(pos)
        bounds = cu.tolist()
    else:
        bounds = [i * t for i in range(b + 1)]
    q, k, v = (x.transpose(1, 2).reshape(b * t, h, d) for x in (query, key, value))
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        seg = [x[s:e].transpose(0, 1) for x in (q, k, v)]
        out[s:e] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scaling).transpose(0, 1)
    return out.reshape(b, t, h, d), None


AttentionInterface.register(NAME, varlen_emulation)
AttentionMaskInterface.register(NAME, flash_attention_mask)


@pytest.fixture
def models(tiny_model_dir):
    from tunesmith.models import load_model_and_tokenizer

    reference, tok = load_model_and_tokenizer(tiny_model_dir)  # sdpa
    flash, _ = load_model_and_tokenizer(tiny_model_dir)
    flash.config._attn_implementation = NAME  # set after loading: transformers would look for the flash package
    return reference.eval(), flash.eval(), tok


def examples(tok, n=6):
    texts = ["the cat sat on the mat", "blue sky", "what is the color of the sea today", "yes", "one two three four",
             "a dog ran"]
    out = []
    for text in texts[:n]:
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": ids, "labels": [IGNORE] + ids[1:]})
    return out


def packed_batch(tok):
    exs = examples(tok)
    rows = pack(exs, max_length=14)
    layout = [[int(i) for i in rows.members[rows.offsets[r]:rows.offsets[r + 1]]] for r in range(len(rows))]
    batch = Collator(tok.pad_token_id)(list(rows))
    assert batch["input_ids"].shape[0] > 1 and any(len(r) > 1 for r in layout)  # several rows, shared rows
    return exs, layout, batch


def test_packed_rows_reach_flash_attention_as_one_row_and_do_not_leak(models):
    reference, flash, tok = models
    exs, layout, batch = packed_batch(tok)
    CALLS.clear()
    with torch.no_grad():
        packed, _ = token_logprobs(flash, batch)
        alone, _ = token_logprobs(reference, Collator(tok.pad_token_id)(exs))
    assert CALLS and all(c["rows"] == 1 and c["varlen"] for c in CALLS), CALLS
    for r, members in enumerate(layout):
        start = 0
        for i in members:
            n = len(exs[i]["input_ids"]) - 1
            torch.testing.assert_close(packed[r, start:start + n], alone[i, :n], atol=1e-5, rtol=1e-5)
            start += n + 1


def test_the_training_loss_of_packed_rows_under_flash_equals_the_unpacked_loss(models, tmp_path):
    from transformers import TrainingArguments

    from tunesmith.recipes.sft.trainer import TunesmithTrainer

    reference, flash, tok = models
    exs, _, batch = packed_batch(tok)
    trainer = TunesmithTrainer(model=flash, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                   report_to="none"))
    CALLS.clear()
    with torch.no_grad():
        loss = trainer.compute_loss(flash, dict(batch))
        direct = causal_lm_loss(flash, dict(batch))
        expected = causal_lm_loss(reference, Collator(tok.pad_token_id)(exs))
    assert CALLS and all(c["rows"] == 1 and c["varlen"] for c in CALLS), CALLS
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct, expected, atol=1e-5, rtol=1e-5)


def test_the_emulation_sees_a_leak_when_rows_stay_apart(models):
    """The control: the same batch sent as several rows takes flash's non-varlen path and differs (the check can
    see a leak)."""
    from tunesmith.scoring import model_inputs

    reference, flash, tok = models
    exs, layout, batch = packed_batch(tok)
    CALLS.clear()
    with torch.no_grad():
        logits = flash(**model_inputs(batch)).logits
        ref = reference(**model_inputs(batch)).logits  # sdpa: block-diagonal mask from the position ids
    assert all(c["rows"] > 1 and not c["varlen"] for c in CALLS)
    assert (logits - ref).abs().max() > 1e-3
