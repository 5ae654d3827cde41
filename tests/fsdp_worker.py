"""Worker for tests/test_fsdp_cpu.py: the same tiny training run in one process, or sharded with FSDP2 (torch's
``fully_shard``) over 2 gloo processes under torchrun, using tunesmith's NEFTune and save code.

    python tests/fsdp_worker.py OUT            # one process, no sharding
    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT   # FSDP2, 2 ranks

Writes OUT/result.json (rank 0): per-step losses, the loss of the saved model reloaded, NEFTune checks under FSDP.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.models import gathered_state_dict, save_model_dir
from tunesmith.neftune import add_noise_to_batch, input_embedding_module, noise_in_forward
from tunesmith.preference.pairs import PairCollator, pair_logps
from tunesmith.scoring import sequence_logprobs

ALPHA = 5.0


def main(out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
        assert dist.get_world_size() == 2, "this check runs on exactly 2 processes"
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = (torch.arange(4 * 12).view(4, 12) * 7) % 120 + 3  # 4 rows of 12 real tokens: equal per-rank token counts
    mine = ids[rank::world]
    losses = []
    for _ in range(3):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)

    # NEFTune under FSDP: the noise is added inside the forward, and every parameter still gets its gradient
    result = {"world": world, "losses": losses}
    mask = torch.ones_like(mine)
    mask[:, 9:] = 0  # the last 3 positions are padding: no noise there
    seen = {}
    probes = [input_embedding_module(model).register_forward_hook(lambda m, a, o: seen.update(clean=o.detach())),
              model.model.layers[0].register_forward_pre_hook(
                  lambda m, a, k: seen.update(noised=(a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)]
    with noise_in_forward(model, mask, ALPHA):
        model(input_ids=mine, attention_mask=mask, labels=mine).loss.backward()
    for p in probes:
        p.remove()
    noise = seen["noised"] - seen["clean"]
    bound = ALPHA / (9 * config.hidden_size) ** 0.5
    result["neftune"] = {
        "params_with_grad": sum(p.grad is not None for p in model.parameters()),
        "params": len(list(model.parameters())),
        "padding_noise": noise[:, 9:].abs().max().item(),
        "max_over_bound": noise[:, :9].abs().max().item() / bound,
    }
    optimizer.zero_grad()
    # SPIN's policy pass (answer-only log-probs: the LM head applied after the forward) on the sharded model
    labels = mine.clone()
    labels[:, :6] = -100
    logps = sequence_logprobs(model, {"input_ids": mine, "attention_mask": torch.ones_like(mine), "labels": labels})
    logps.sum().backward()
    gathered = [torch.zeros_like(logps) for _ in range(world)] if world > 1 else [logps.detach()]
    if world > 1:
        dist.all_gather(gathered, logps.detach())
    result["sequence_logprobs"] = sorted(torch.cat(gathered).tolist())
    result["sequence_logprobs_grads"] = sum(p.grad is not None for p in model.parameters())
    optimizer.zero_grad()
    # the preference engine's policy pass: both answers of each pair in one padding-free row, on the sharded model
    pairs = [{"prompt_ids": r[:6].tolist(), "chosen_ids": r[6:].tolist(), "rejected_ids": r[6:].flip(0).tolist()}
             for r in mine]
    lp = pair_logps(model, PairCollator(0, 12, padding_free=True)(pairs))
    (lp.chosen - lp.rejected).sum().backward()
    both = torch.stack([lp.chosen, lp.rejected], 1).detach()
    gathered = [torch.zeros_like(both) for _ in range(world)] if world > 1 else [both]
    if world > 1:
        dist.all_gather(gathered, both)
    result["pair_logps"] = sorted(x for row in torch.cat(gathered).tolist() for x in row)
    result["pair_logps_grads"] = sum(p.grad is not None for p in model.parameters())
    optimizer.zero_grad()
    # the other mechanism (embeddings computed outside the forward) cannot run on a sharded model
    try:
        add_noise_to_batch(model, {"input_ids": mine, "attention_mask": mask}, ALPHA)
        result["inputs_embeds_outside_forward"] = "ran"
    except RuntimeError as e:
        result["inputs_embeds_outside_forward"] = str(e).splitlines()[0][:120]

    state = gathered_state_dict(model)  # every rank takes part
    if rank == 0:
        save_model_dir(model, None, out / "model", state_dict=state)
        reloaded = LlamaForCausalLM.from_pretrained(out / "model")
        with torch.no_grad():
            result["reloaded_loss"] = reloaded(input_ids=ids, labels=ids).loss.item()
        (out / "result.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
