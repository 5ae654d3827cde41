"""`tunesmith selftest`: the CPU form runs whole (every check passes or is skipped with its reason), and the runner's
rules hold: a check that raises is a fail with its first line while the others still run, a missing optional module
is a skip, the reports are written and the exit code says whether anything failed."""
import json
from functools import partial

import pytest

from tunesmith.cli import main
from tunesmith.selftest.checks import CHECKS, lora
from tunesmith.selftest.run import SelftestArgs, Spec, run_selftest

GPU_ONLY = {"packed_flex_attention", "packed_flash_attention_2", "padding_free_flash_attention_2", "plan_vs_measured",
            "accelerate_fsdp2", "accelerate_zero3"}


@pytest.mark.slow
def test_cpu_form_runs_every_check(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["selftest", "--quick", "--device", "cpu", "--output", str(out)]) == 0
    results = json.loads((out / "selftest.json").read_text())
    by_name = {r["name"]: r for r in results}
    assert [r["name"] for r in results] == [s.name for s in CHECKS]
    assert all(set(r) == {"name", "status", "figures", "reason"} for r in results)
    assert {n for n, r in by_name.items() if r["status"] == "skip"} == GPU_ONLY
    assert all(by_name[n]["reason"] for n in GPU_ONLY)
    assert all(r["status"] == "pass" for n, r in by_name.items() if n not in GPU_ONLY), \
        [(n, r["reason"]) for n, r in by_name.items() if r["status"] == "fail"]
    f = {n: r["figures"] for n, r in by_name.items()}
    # each check measured what it claims: packed rows equal unpacked ones far below what a leak would change
    for name in ("packed_sdpa", "padding_free_sdpa"):
        assert f[name]["max_abs_dlogp"] <= 1e-3 < f[name]["leak_control_max_abs_dlogp"] / 4
    assert f["packed_sdpa"]["rows"].split(" x ")[0] != "1"  # batch > 1
    assert f["neftune_bf16"]["padding_max_noise"] == 0 and f["neftune_bf16"]["eval_forwards_clean"].startswith("1")
    assert f["lean_logits"]["vocab"] == 152064 and f["lean_logits"]["loss_rel_diff"] <= 1e-5
    assert "trl_tokens_per_s" in f["sft_vs_trl"] and "step_time_ratio" in f["sft_vs_trl"]
    assert "--config_file examples/accelerate/ddp.yaml" in f["accelerate_ddp"]["command"]
    assert f["accelerate_ddp"]["reloaded_eval_loss"] == pytest.approx(f["accelerate_ddp"]["run_eval_loss"], rel=1e-4)
    assert f["spin_iteration"]["raw_generate_tokens_per_s"] > 0
    md = (out / "selftest.md").read_text()
    assert "| 3 | packed_sdpa | pass |" in md and "skip" in md
    printed = capsys.readouterr().out
    assert "packed_flash_attention_2" in printed and "pass" in printed.lower()


def boom(ctx, r):
    r.figures["before"] = 1
    raise ValueError("the first line\nand a second one")


def broken_expectation(ctx, r):
    r.figures["x"] = 2
    r.expect(False, "x should have been 3")
    r.expect(True, "never shown")


def fine(ctx, r):
    r.figures["ok"] = True


def test_failures_and_missing_modules_are_reported_and_the_other_checks_run(tmp_path, capsys):
    specs = [Spec("1", "raises", boom), Spec("2", "broken", broken_expectation),
             Spec("6", "qlora", partial(lora, quantized=True), requires=("tunesmith_no_such_module",)),
             Spec("7", "gpu", fine, cuda_only=True, cpu_reason="needs CUDA"),
             Spec("9", "fine", fine)]
    out = tmp_path / "reports"
    code = run_selftest(SelftestArgs(quick=True, device="cpu", output=str(out)), specs)
    assert code == 1
    results = {r["name"]: r for r in json.loads((out / "selftest.json").read_text())}
    assert results["raises"]["status"] == "fail" and results["raises"]["reason"] == "ValueError: the first line"
    assert results["raises"]["figures"]["before"] == 1  # figures taken before the exception are kept
    assert results["broken"]["status"] == "fail" and results["broken"]["reason"] == "x should have been 3"
    assert results["qlora"]["status"] == "skip" and "tunesmith_no_such_module is not installed" in \
        results["qlora"]["reason"]
    assert results["gpu"] == {"name": "gpu", "status": "skip", "figures": {}, "reason": "needs CUDA"}
    assert results["fine"]["status"] == "pass"
    md = (out / "selftest.md").read_text()
    assert "| 1 | raises | fail |" in md and "3 fail" not in md and "2 fail, 2 skip" in md
    assert "Traceback" in (out / "selftest.log").read_text()
    printed = capsys.readouterr().out
    assert "FAILED: raises, broken" in printed

    assert run_selftest(SelftestArgs(device="cpu", output=str(out)), [Spec("9", "fine", fine)]) == 0


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["selftest", "--device", "tpu"]) == 2
    assert "field 'device' must be auto, cuda or cpu" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["selftest", "--output", str(tmp_path / "file")]) == 2
    assert "'output' is a file" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["selftest", "--device", "cuda", "--output", str(tmp_path / "o")]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err


def test_mfu_inputs():
    from tunesmith.selftest.measure import flops_per_token, peak_tflops
    from tunesmith.selftest.workspace import GPU, build_model

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None
    # 6 FLOPs per parameter and token plus attention's 12 * layers * width * sequence (PaLM's count)
    assert flops_per_token(1_000, 2, 8, 16) == 6_000 + 12 * 2 * 8 * 16
    # the GPU form's SFT model is Llama 3.2 1B's shape: 1.236B parameters (counted on the meta device)
    model = build_model(None, GPU.sft, "bfloat16", "meta")
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    assert model.config.vocab_size == 128256 and model.config.tie_word_embeddings
