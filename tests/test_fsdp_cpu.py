"""FSDP on CPU: 2 gloo processes under torchrun, the model sharded with FSDP2 (torch's ``fully_shard``), train with
the same losses as 1 process, save a whole model through tunesmith's collective save, and keep NEFTune exact.

Why not through the recipes: accelerate 1.15 switches to FSDP only for GPU-type distributed setups (its
AcceleratorState sets DistributedType.FSDP for MULTI_GPU / NPU / XPU / ..., never MULTI_CPU), so on a CPU the
Trainer runs plain DDP under ``use_cpu`` and refuses ``fsdp`` otherwise ("Using fsdp only works in distributed
training"). torch's FSDP2 itself runs on gloo, so the pieces tunesmith adds for FSDP are checked here directly:
``models.gathered_state_dict`` + ``save_model_dir`` and ``neftune.noise_in_forward``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

WORKER = Path(__file__).parent / "fsdp_worker.py"
SRC = Path(__file__).parent.parent / "src"


def run(out: Path, processes: int) -> dict:
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(WORKER), str(out)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_matches_one_process(tmp_path):
    one = run(tmp_path / "one", 1)
    two = run(tmp_path / "two", 2)
    assert one["world"] == 1 and two["world"] == 2
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)  # same training, sharded
    assert two["losses"][-1] < two["losses"][0]
    # the saved model is whole: it reloads without FSDP and scores the full batch as the 1-process model does
    assert two["reloaded_loss"] == pytest.approx(one["reloaded_loss"], rel=1e-5)
    # NEFTune inside the forward: every parameter (the sharded embedding too) gets its gradient, padding gets no
    # noise, real tokens stay within alpha / sqrt(L * d) and reach it
    for result in (one, two):
        n = result["neftune"]
        assert n["params_with_grad"] == n["params"]
        assert n["padding_noise"] == 0.0 and 0.9 < n["max_over_bound"] <= 1.0 + 1e-6
    # SPIN's answer-only log-probs (LM head applied after the forward) work on the shards, with every gradient
    assert two["sequence_logprobs"] == pytest.approx(one["sequence_logprobs"], rel=1e-5)
    assert two["sequence_logprobs_grads"] == two["neftune"]["params"]
    # the preference engine's pair log-probs (padding-free rows, summed per answer) too
    assert two["pair_logps"] == pytest.approx(one["pair_logps"], rel=1e-5)
    assert two["pair_logps_grads"] == two["neftune"]["params"]
    # computing the embeddings outside the forward (inputs_embeds) cannot work on a sharded model
    assert one["inputs_embeds_outside_forward"] == "ran"
    assert "DTensor" in two["inputs_embeds_outside_forward"]
