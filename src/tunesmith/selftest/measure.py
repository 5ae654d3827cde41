"""Measurements the self-test takes the same way for tunesmith and for its peers: optimizer-step times and losses
(a TrainerCallback), peak device memory of a phase, and model FLOPs utilisation."""
from __future__ import annotations

import gc
import statistics
import time

import torch

GiB = 2 ** 30

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets, matched by substring of
# torch.cuda.get_device_name() (first match wins). MFU is reported only for a device listed here.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("A6000", 155.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def flops_per_token(params: int, layers: int, hidden: int, seq: int) -> float:
    """Training FLOPs per token of a decoder (forward + backward): 6 per parameter for the matrix multiplies (the
    tied embedding counts once, as the output head) plus 12 * layers * hidden * seq for attention scores and values
    (PaLM, Chowdhery et al. 2022, appendix B)."""
    return 6.0 * params + 12.0 * layers * hidden * seq


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Peak:
    """``with Peak(device) as p: ...`` -> ``p.bytes``: the most device memory allocated during the block beyond what
    was allocated when it began (torch's caching allocator statistics); None on a CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.bytes = None

    def __enter__(self):
        if self.cuda:
            free_memory()
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        return False


def step_timer():
    """A TrainerCallback recording the wall time of every optimizer step (device synchronised at both ends), the
    logged losses and the non-padding tokens seen."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.losses, self.tokens = [], [], 0

        def _sync(self):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.seconds.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            self.tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)

        def median_step(self, warmup: int) -> float:
            timed = self.seconds[warmup:] or self.seconds
            return statistics.median(timed)

    return StepTimer()
