"""tunesmith.scoring: the lean causal-LM loss and log-probs (no batch x sequence x vocabulary tensor) against the
model's own full logits, packed rows scored as if alone, the fallback for heads that are not a plain projection, and
token-weighted dataset loss. Packed rows under FlashAttention: tests/test_packed_flash.py."""
import pytest
import torch

from conftest import ScaledLogits, alpaca_rows
from tunesmith import scoring
from tunesmith.data.collate import Collator, pack
from tunesmith.data.templates import get_template
from tunesmith.data.tokenize import IGNORE

ML = 256  # max_length


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_LOGITS", 7 * 400)  # 7 tokens per chunk at this vocabulary: many chunks


def lm_and_batch(tiny_model_dir, packed=False):
    from tunesmith.data.formats import Example, Turn
    from tunesmith.data.tokenize import encode
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    t = get_template("qa")
    enc = [encode(tok, t, Example(turns=[Turn(r["instruction"], r["output"])]), ML) for r in alpaca_rows(5)]
    enc.append({"input_ids": enc[0]["input_ids"][:9], "labels": enc[0]["input_ids"][:9]})
    batch = Collator(tok.pad_token_id)(pack(enc, 70) if packed else enc)
    return model, batch


def full_logprobs(model, batch):
    """The plain computation, written independently: full logits, log-softmax, gather."""
    logits = model(**scoring.model_inputs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def test_packed_and_unpacked_batches_give_the_same_loss(tiny_model_dir, tiny_tokenizer):
    from tunesmith.data.formats import Example, Turn
    from tunesmith.data.tokenize import encode
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    t = get_template("qa")
    rows = alpaca_rows(6)
    enc = [encode(tok, t, Example(turns=[Turn(r["instruction"], r["output"])]), 128) for r in rows]
    enc.append({"input_ids": enc[0]["input_ids"][:9], "labels": enc[0]["input_ids"][:9]})  # trains its first token
    collate = Collator(tok.pad_token_id)

    def total(batch):
        logp, mask = scoring.token_logprobs(model, batch)
        return -logp.sum() / mask.sum(), mask.sum()

    with torch.no_grad():
        plain, n_plain = total(collate(enc))
        packed_rows = pack(enc, 80)
        assert len(packed_rows) < len(enc)
        packed, n_packed = total(collate(packed_rows))
    assert n_plain == n_packed - 0  # the same trained tokens (an example's first token is never a target)
    assert abs(plain.item() - packed.item()) < 1e-5

    # no leakage: changing one packed example leaves its row-mates' log-probs untouched
    row = packed_rows[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 2
    changed = dict(row, input_ids=[(x + 1) % 300 if i < starts[1] else x for i, x in enumerate(row["input_ids"])])
    with torch.no_grad():
        a, _ = scoring.token_logprobs(model, collate([row]))
        b, _ = scoring.token_logprobs(model, collate([changed]))
    assert torch.allclose(a[0, starts[1]:], b[0, starts[1]:], atol=1e-6)
    assert not torch.allclose(a[0, :starts[1] - 1], b[0, :starts[1] - 1])


@pytest.mark.parametrize("packed", [False, True])
def test_lean_loss_and_gradients_equal_the_models_own(tiny_model_dir, small_chunks, packed):
    model, batch = lm_and_batch(tiny_model_dir, packed)
    model.train()
    n_items = torch.tensor(int((batch["labels"][:, 1:] != IGNORE).sum()) + 17)  # as if more came in accumulation
    for num_items in (n_items, None):
        inputs = scoring.model_inputs(batch)
        if num_items is not None:
            inputs["num_items_in_batch"] = num_items
        model.zero_grad()
        own = model(**inputs, labels=batch["labels"]).loss
        own.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        lean = scoring.causal_lm_loss(model, batch, num_items)
        lean.backward()
        assert abs(lean.item() - own.item()) < 1e-5
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, expected[n], atol=1e-5, rtol=1e-4), n


def test_lean_log_probs_equal_full_logits_with_and_without_gradients(tiny_model_dir, small_chunks):
    model, batch = lm_and_batch(tiny_model_dir, packed=True)
    model.eval()
    with torch.no_grad():
        ref, ref_mask = full_logprobs(model, batch)
        logp, mask = scoring.token_logprobs(model, batch)
    assert torch.equal(mask, ref_mask) and torch.allclose(logp, ref, atol=1e-5)
    with torch.no_grad():  # lm-eval's question: log p of a continuation, and is each token the most likely one?
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
        lp, hits = scoring.target_logprobs(model, batch, targets, greedy=True)
        logits = model(**scoring.model_inputs(batch)).logits
    assert torch.allclose(lp[:, :-1], ref, atol=1e-5)
    expected_hits = (logits.argmax(-1) == targets) & (targets != IGNORE)
    assert torch.equal(hits, expected_hits)
    seq = scoring.sequence_logprobs(model, batch)  # with gradients (SPIN's policy pass)
    seq.sum().backward()
    lean_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_seq = full_logprobs(model, batch)[0].sum(1)
    ref_seq.sum().backward()
    assert torch.allclose(seq, ref_seq, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, lean_grads[n], atol=1e-5, rtol=1e-4), n
    loss = scoring.dataset_loss(model, [batch])
    assert loss["tokens"] == int(mask.sum())
    assert loss["loss"] == pytest.approx(float(-ref.sum() / ref_mask.sum()), abs=1e-5)


class _BiggestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_batch_by_sequence_by_vocabulary_tensor(tiny_model_dir, small_chunks):
    model, batch = lm_and_batch(tiny_model_dir)
    vocab = model.get_output_embeddings().weight.shape[0]
    full = batch["input_ids"].numel() * vocab
    with _BiggestTensor() as seen:
        full_logprobs(model, batch)[0].sum().backward()
    assert seen.largest >= full  # the plain computation does build it (so this test can fail)
    with _BiggestTensor() as seen:  # the model without its head: attention, embeddings and their gradients
        model(**scoring.model_inputs(batch), logits_to_keep=1).logits.sum().backward()
    body = seen.largest
    assert body < full
    for run in (lambda: scoring.causal_lm_loss(model, batch).backward(),
                lambda: scoring.dataset_loss(model, [batch])):
        with _BiggestTensor() as seen:
            run()
        assert seen.largest <= max(body, scoring.CHUNK_LOGITS)


def test_lean_scoring_takes_the_final_hidden_states_without_keeping_every_layer(tiny_model_dir):
    """output_hidden_states would hold one batch x sequence x width tensor per layer: the decoder's output is taken."""
    model, batch = lm_and_batch(tiny_model_dir)
    model.eval()
    asked = []
    model.register_forward_pre_hook(lambda _m, _a, kw: asked.append(dict(kw)), with_kwargs=True)
    with torch.no_grad():
        lean = scoring.sequence_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    full = (torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            * (labels != -100)).sum(-1)
    assert asked[0].get("logits_to_keep") == 1 and not asked[0].get("output_hidden_states")
    assert torch.allclose(lean, full, atol=1e-4)
    assert model not in scoring._FULL_LOGITS


def test_a_head_that_is_not_a_plain_projection_falls_back_to_full_logits(tiny_model_dir, small_chunks):
    model, batch = lm_and_batch(tiny_model_dir)
    scaled = ScaledLogits(model.eval())
    with torch.no_grad():
        ref, _ = full_logprobs(scaled, batch)
        plain, _ = full_logprobs(model, batch)
        assert (ref - plain).abs().max() > 0.1
        logp, _ = scoring.token_logprobs(scaled, batch)
    assert torch.allclose(logp, ref, atol=1e-5)


def test_rows_loss_ranks_score_disjoint_shares_that_sum_to_the_whole(tiny_model_dir):
    """Under torch.distributed each rank scores rows rank, rank + world_size, ... and the sums are all-reduced: the
    shares (scored here without a process group, so not reduced) must cover every row once."""
    from tunesmith.data.formats import Example, Turn
    from tunesmith.data.tokenize import encode
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    t = get_template("qa")
    rows = [encode(tok, t, Example(turns=[Turn(r["instruction"], r["output"])]), ML) for r in alpaca_rows(7)]
    collate = Collator(tok.pad_token_id)
    whole = scoring.rows_loss(model, rows, collate, batch_size=3)
    shares = [scoring.rows_loss(model, rows, collate, batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert sum(s["tokens"] for s in shares) == whole["tokens"] == sum(
        sum(1 for y in r["labels"][1:] if y != IGNORE) for r in rows)
    nll = sum(s["loss"] * s["tokens"] for s in shares)
    assert nll / whole["tokens"] == pytest.approx(whole["loss"], abs=1e-5)
    assert whole["perplexity"] == pytest.approx(float(torch.exp(torch.tensor(whole["loss"]))), rel=1e-6)
