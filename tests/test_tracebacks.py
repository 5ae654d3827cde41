"""Issue 18.6: the remaining tracebacks become one line — here a full disk while a checkpoint is written (torch's
inline_container.cc RuntimeError); the run resumes afterwards exactly as before."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import sft_config
from tunesmith.rundir import FINISHED_FILE, checkpoint_problem, checkpoints

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk would
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from tunesmith.cli import main
sys.exit(main(sys.argv[1:]))
"""


def argv(cfg):
    return ["sft"] + [x for k, v in cfg.items() for x in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(tiny_model_dir, alpaca_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, alpaca_file, out, max_steps=3, save_strategy="steps", save_steps=1,
                     train_loss_eval_samples=0)
    size = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    # the weights (size) fit, the optimizer state (two float32 moments: ~2 x size) does not
    proc = subprocess.run([sys.executable, "-c", LIMITED.format(limit=int(size * 1.5))] + argv(cfg),
                          capture_output=True, text=True, timeout=600)
    err = proc.stderr.strip()
    assert proc.returncode == 1, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("tunesmith sft: error: writing failed"), err[-3000:]
    assert "resume_from_checkpoint" in last
    assert not (out / FINISHED_FILE).exists()
    assert all(checkpoint_problem(c) for c in checkpoints(out))  # the torn one is not taken for complete
    # with space again, the run resumes (from its newest complete checkpoint, or afresh when none is) and equals an
    # uninterrupted run
    from tunesmith.recipes import sft

    sft.train(cfg | {"resume_from_checkpoint": any(checkpoint_problem(c) is None for c in checkpoints(out))})
    ref = tmp_path / "ref"
    sft.train(cfg | {"output_dir": str(ref)})
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
