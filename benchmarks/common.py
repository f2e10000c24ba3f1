"""Shared pieces of the benchmarks: device choice, model shapes, timing, peak memory, result rows.

Nothing here imports ``datasets`` or ``evaluate`` (the GPU image lacks them); models are built from
configs, so no asset or Hub access is needed except SmolLM2 on the CPU path.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Kineto (the torch profiler used for CPU peak memory) logs "USDT: ... profiler_start/stop" lines on stderr at
# every profile; level 6 keeps them (and its warm-up STAGE lines) out of the benchmark output. Read at first use.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402

from hf_softmask.utils.memory import peak_rss_bytes, reset_peak_rss  # noqa: E402, F401  (peak_rss_bytes: diagnostics)

# Llama shapes: (hidden, layers, heads, kv heads, FFN width, vocab).
SHAPES: dict[str, dict] = {
    # TinyLlama-1.1B: the ~1B Llama of the targets.
    "llama-1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
    ),
    # SmolLM2-135M (GQA 9/3 heads, tied embeddings).
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    # The 1.1B shape scaled down (head_dim 64, GQA, FFN 2.75x hidden) so a loaded 2-core CPU finishes in seconds.
    "llama-cpu-mini": dict(
        hidden_size=384,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=1056,
        vocab_size=4000,
    ),
}


@dataclass
class Env:
    """Where and how the benchmarks run."""

    device: torch.device
    dtype: torch.dtype
    quick: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        if self.cuda:
            name = torch.cuda.get_device_name(self.device)
        else:
            name = f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        return f"{name} | torch {torch.__version__} | {str(self.dtype).replace('torch.', '')}"


def make_env(device: str | None = None, quick: bool = False, threads: int | None = None) -> Env:
    """GPU in bf16 when available, else CPU in fp32 (bf16 matmuls on a CPU measure the emulation, not the method)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return Env(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, quick)


def llama_model(shape: str, env: Env, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` of a named shape, on ``env.device`` in ``env.dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=0, **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(env.device):
        model = LlamaForCausalLM(cfg).to(env.dtype)
    return model


def smollm2_model(env: Env):
    """SmolLM2-135M: the shipped checkpoint on a CPU, its shape from a config on a GPU (no assets there)."""
    if env.cuda:
        return llama_model("smollm2-135m", env)
    from hf_softmask.utils.assets import load_smollm2

    model, _ = load_smollm2(dtype=env.dtype)
    return model.to(env.device)


def lm_batch(vocab: int, batch: int, seq: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def random_importance(model, seed: int = 0):
    """Importance in [0, 1] of the shape of ``model`` (the cost of masking does not depend on its values)."""
    from hf_softmask import UnitImportance, UnitLayout

    layout = UnitLayout.from_model(model)
    g = torch.Generator().manual_seed(seed)
    return UnitImportance(
        torch.rand(layout.num_layers, layout.num_heads, generator=g),
        torch.rand(layout.num_layers, layout.ffn_size, generator=g),
    )


def clock(env: Env) -> Callable[[], float]:
    """Seconds: wall time on a GPU; on a CPU this process's CPU time, which other jobs on a shared machine
    inflate far less than wall time (exact with one torch thread, the default of ``make_env`` on a CPU)."""
    return time.perf_counter if env.cuda else time.process_time


def sync(env: Env) -> None:
    if env.cuda:
        torch.cuda.synchronize(env.device)


# -- peak memory ------------------------------------------------------------------------------------
def reset_peak(env: Env) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
        return
    reset_peak_rss()  # Linux only; elsewhere peak_rss_bytes reads None anyway


def peak_bytes(env: Env) -> int | None:
    """Peak allocated GPU memory since :func:`reset_peak`; ``None`` on a CPU.

    The CPU has no allocator statistics; the process's peak RSS (``peak_rss_bytes``) was tried and gave
    0.72x-1.10x for the same DAS comparison in two runs (freed memory the allocator keeps, other
    variants' state), so no CPU memory ratio is reported.
    """
    if env.cuda:
        return torch.cuda.max_memory_allocated(env.device)
    return None


# -- timing -----------------------------------------------------------------------------------------
@dataclass
class Timing:
    ms: float  # median milliseconds per call
    spread: float  # (max - min) / median over the timed calls
    peak: int | None  # bytes, see peak_bytes
    faults: float | None = None  # median minor page faults per call (CPU; the kernel maps fresh memory in)


def measure(fn: Callable[[], None], env: Env, warmup: int, iters: int) -> Timing:
    """Median wall time of ``fn`` (synchronised on a GPU) and the peak memory over the timed calls."""
    for _ in range(warmup):
        fn()
    sync(env)
    reset_peak(env)
    times, now = [], clock(env)
    for _ in range(iters):
        t0 = now()
        fn()
        sync(env)
        times.append((now() - t0) * 1e3)
    med = statistics.median(times)
    return Timing(med, (max(times) - min(times)) / med if med > 0 else 0.0, peak_bytes(env))


def _minor_faults() -> int:
    # Pages the kernel mapped in for this process: a step whose temporaries come from fresh mappings pays for them.
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    fns: dict[str, Callable[[], None]], env: Env, warmup: int, rounds: int, iters: int = 1
) -> dict[str, Timing]:
    """Time several variants in alternating rounds, so load changes on a shared machine hit all alike.

    Returns per variant the median over rounds of its per-call time; peak memory is from a separate
    pass per variant (the peak of interleaved runs would mix the variants).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(env)
    per: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, list[int]] = {k: [] for k in fns}
    now = clock(env)
    for _ in range(rounds):
        for name, fn in fns.items():
            f0 = _minor_faults()
            t0 = now()
            for _ in range(iters):
                fn()
            sync(env)
            per[name].append((now() - t0) * 1e3 / iters)
            faults[name].append(_minor_faults() - f0)
    peaks = {}
    for name, fn in fns.items():
        reset_peak(env)
        fn()
        sync(env)
        peaks[name] = peak_bytes(env)
    out = {}
    for name, times in per.items():
        med = statistics.median(times)
        spread = (max(times) - min(times)) / med if med > 0 else 0.0
        out[name] = Timing(med, spread, peaks[name], statistics.median(faults[name]) / iters)
    return out


# -- results ----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One comparison: ``variant`` against ``baseline`` (ratio = variant / baseline; < 1 is faster)."""

    bench: str
    model: str
    variant: str
    baseline: str
    value: float
    base_value: float
    unit: str = "ms"
    target: str = ""
    mem_ratio: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.base_value if self.base_value else float("nan")

    def verdict(self) -> str:
        """'ok' / 'MISS' against a target like '<=1.03x' or '>=0.7x' (ratio), '' without one."""
        t = self.target.replace("x", "").strip()
        if not t:
            return ""
        ok = True
        for part in t.split(","):
            part = part.strip()
            if part.startswith("<="):
                ok &= self.ratio <= float(part[2:])
            elif part.startswith(">="):
                ok &= self.ratio >= float(part[2:])
            elif part.startswith("mem<="):
                ok &= self.mem_ratio is None or self.mem_ratio <= float(part[5:])
        return "ok" if ok else "MISS"

    def as_dict(self) -> dict:
        d = {
            k: getattr(self, k)
            for k in (
                "bench",
                "model",
                "variant",
                "baseline",
                "value",
                "base_value",
                "unit",
                "target",
                "mem_ratio",
                "note",
            )
        }
        d.update(ratio=self.ratio, verdict=self.verdict(), **self.extra)
        return d


def ratio_of_peaks(a: int | None, b: int | None) -> float | None:
    return a / b if a and b else None


def free(*objs) -> None:
    """Drop references and return memory before the next measurement."""
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
