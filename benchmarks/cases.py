"""What is benchmarked: shapes, providers and the byte model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import alphadiv_kernels as ak

# A call's fixed cost (1 x 10), supernet KD (ImageNet classes) and LLM distillation (vocabularies), per
# device. The CPU default is the quick set (about two minutes on 2 cores); --full adds the 4096 x 32000 LLM
# case and longer timing.
DEFAULT_SHAPES = {
    "cpu": ["1x10", "32x1000", "256x1000", "2048x1000", "512x32000"],
    "cuda": ["1x10", "32x1000", "256x1000", "2048x1000", "8192x128256", "16384x131072"],
}
FULL_SHAPES = {
    "cpu": ["1x10", "32x1000", "256x1000", "2048x1000", "4096x32000"],
    "cuda": DEFAULT_SHAPES["cuda"],
}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
MODES = ("fwd", "fwd+bwd")

Step = Callable[[], None]


@dataclass(frozen=True)
class Case:
    rows: int
    cols: int
    dtype: torch.dtype
    device: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.cols}"

    def bytes_moved(self) -> int:
        """Byte model: read student + read teacher (+ write the gradient, in fwd+bwd)."""
        element = torch.finfo(self.dtype).bits // 8
        tensors = 3 if self.mode == "fwd+bwd" else 2
        return self.rows * self.cols * element * tensors

    def make_inputs(self, seed: int = 0):
        # drawn on the device: a CPU draw of 8192 x 128256 takes seconds and 4 GB of host memory
        generator = torch.Generator(device=self.device).manual_seed(seed)
        draw = lambda: (torch.randn(self.rows, self.cols, generator=generator, device=self.device) * 3).to(self.dtype)
        return draw(), draw()


def parse_shape(text: str) -> tuple:
    try:
        rows, cols = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not of the form NxC (e.g. 2048x1000)") from None
    if rows <= 0 or cols <= 0:
        raise SystemExit(f"--shapes: {text!r} needs positive sizes")
    return rows, cols


def _liger_kl() -> Optional[Callable]:
    try:
        from liger_kernel.transformers import LigerKLDIVLoss  # type: ignore
    except ImportError:
        return None
    loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return lambda s, t: loss(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))


# The baselines a user would pick today: AlphaNet's own loss code (`AdaptiveLossSoft`, what users of
# the reference run) and this project's eager specification, each eager and under torch.compile.
EAGER_BASELINES = ("alphanet-eager", "reference-eager")
COMPILED_BASELINES = ("alphanet-compile", "reference-compile")
COMPILE_MODES = {"cpu": ("default",), "cuda": ("default", "max-autotune-no-cudagraphs", "reduce-overhead")}
# The floor: one log_softmax of the student, forward only in every mode (not a KD loss).
LOG_SOFTMAX = "log_softmax (floor)"
LIGER_KL = "liger-kl (alpha 1,1)"
# What a user who only wants forward KL writes: not the adaptive loss, but the cost a KD loss call is held to.
KL_EAGER = "kl-eager (alpha 1,1)"


def kl_eager(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of the teacher's p and the student's q, batch mean: `F.kl_div` on two log-softmaxes."""
    return torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                      reduction="batchmean", log_target=True)


def available_providers(device: str) -> Dict[str, Callable]:
    """Loss functions (student, teacher) -> scalar, by provider name, for this device."""
    providers: Dict[str, Callable] = {
        "alphanet-eager": ak.alphanet_adaptive_loss_soft,
        "alphanet-compile": torch.compile(ak.alphanet_adaptive_loss_soft),
        "reference-eager": ak.adaptive_kd_reference,
        "reference-compile": torch.compile(ak.adaptive_kd_reference),
    }
    for backend in ak.available_backends():
        if backend == "reference" or (backend == "cpu") != (device == "cpu"):
            continue
        providers[f"fused-{backend}"] = lambda s, t, backend=backend: ak.fused_adaptive_kd(s, t, backend=backend)
    # The op itself under torch.compile (opt-in: --providers), in the modes a GPU training loop picks.
    for mode in COMPILE_MODES[device]:
        providers[f"fused-compile ({mode})"] = torch.compile(ak.fused_adaptive_kd, mode=mode)
    if device == "cuda" and _liger_kl() is not None:
        providers[LIGER_KL] = _liger_kl()
    providers[KL_EAGER] = kl_eager
    providers[LOG_SOFTMAX] = lambda s, t: torch.log_softmax(s, -1)
    return providers


DEFAULT_PROVIDERS = EAGER_BASELINES + COMPILED_BASELINES + ("fused-cpu", "fused-cuda", "fused-triton", LIGER_KL,
                                                            KL_EAGER, LOG_SOFTMAX)


def fastest(medians: Dict[str, float], candidates) -> Optional[str]:
    """The candidate provider with the smallest median time in this case (None if none ran)."""
    present = [name for name in candidates if name in medians]
    return min(present, key=medians.__getitem__) if present else None


def make_step(loss_fn: Callable, student: torch.Tensor, teacher: torch.Tensor, mode: str) -> Step:
    """One call of the provider in the given mode; fwd+bwd includes the backward into the student."""
    if mode == "fwd":
        def forward() -> None:
            with torch.no_grad():
                loss_fn(student, teacher)
        return forward
    leaf = student.detach().clone().requires_grad_(True)

    def forward_backward() -> None:
        loss_fn(leaf, teacher).backward()
        leaf.grad = None
    return forward_backward


def select_providers(requested: Optional[List[str]], device: str) -> Dict[str, Callable]:
    providers = available_providers(device)
    if requested is None:
        return {name: fn for name, fn in providers.items() if name in DEFAULT_PROVIDERS}
    unknown = [name for name in requested if name not in providers]
    if unknown:
        raise SystemExit(f"--providers: {', '.join(unknown)} not available on {device}; "
                         f"choose from {', '.join(providers)}")
    return {name: providers[name] for name in requested}
