"""PyTorch ports of jbnn's ResNet-18-sized models, with the Flax weights copied in.

Benchmark-only code: jbnn itself never imports torch. The ports compute what the Flax
modules compute, layer for layer, so that Captum and jbnn explain the same function:

* ``birealnet18`` and ``binary_resnet_e18`` (:mod:`jbnn.models.birealnet`,
  :mod:`jbnn.models.resnet_e`), BNN and full-precision twin; ``resnet18``, the plain
  ResNet-18 of :mod:`benchmarks.plain_resnet` (for profiling);
* the sign quantizers are ``torch.autograd.Function`` s with Larq's forward
  (sign(0) = +1) and jbnn's backward (``approx_sign``: (2 - 2|x|) 1[|x| <= 1];
  ``ste_sign``: 1[|x| <= clip]; ``magnitude_aware_sign``: mean|w| per output channel
  times ``ste_sign``), so that input gradients pass through the same surrogates;
* "SAME" padding as XLA computes it (``lax.padtype_to_pads``: the extra row / column of
  an even total goes at the end), as timm's ``Conv2dSame`` does: a symmetric pad where
  it is symmetric, else ``F.pad`` (or ``ceil_mode`` for pools that only pad at the end);
  max-pool pads with -inf, average pools divide by the number of real inputs
  (``count_include_pad=False``).

Use :func:`port` to build the torch module from a Flax model and its variables, and
:func:`logit_errors` / :func:`check_port` to check that both give the same logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["check_port", "logit_errors", "port", "same_pads", "to_torch_images"]


# --------------------------------------------------------------------------- quantizers
def _sign(x: torch.Tensor) -> torch.Tensor:
    """Larq's sign: +1 for x >= 0 (sign(0) = +1), -1 otherwise."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class SteSign(torch.autograd.Function):
    """sign(x) forward; gradient times 1[|x| <= clip_value] backward (Larq's ste_sign)."""

    @staticmethod
    def forward(ctx, x, clip_value):
        ctx.save_for_backward(x)
        ctx.clip_value = clip_value
        return _sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= ctx.clip_value).to(g.dtype), None


class ApproxSign(torch.autograd.Function):
    """sign(x) forward; gradient times (2 - 2|x|) 1[|x| <= 1] backward (Bi-Real Net)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        a = x.abs()
        return g * torch.where(a <= 1.0, 2.0 - 2.0 * a, torch.zeros_like(a))


def _quantize_input(x: torch.Tensor, spec: str | None) -> torch.Tensor:
    if spec is None:
        return x
    if spec == "approx_sign":
        return ApproxSign.apply(x)
    if spec.startswith("ste_sign"):
        return SteSign.apply(x, _clip_of(spec))
    raise ValueError(f"torch port: unsupported input quantizer {spec!r}")


def _quantize_kernel(w: torch.Tensor, spec: str | None) -> torch.Tensor:
    """w is OIHW; jbnn's magnitude scale is per output channel (the first axis here)."""
    if spec is None:
        return w
    if spec.startswith("magnitude_aware_sign"):
        scale = w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
        return scale * SteSign.apply(w, _clip_of(spec))
    if spec.startswith("ste_sign"):
        return SteSign.apply(w, _clip_of(spec))
    raise ValueError(f"torch port: unsupported kernel quantizer {spec!r}")


def _clip_of(spec: str) -> float:
    from jbnn.quantizers import parse_spec

    _, hp = parse_spec(spec)
    clip = hp.get("clip_value", 1.0)
    return math.inf if clip is None else float(clip)


# --------------------------------------------------------------------------- padding
def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's "SAME" padding (lo, hi) of one spatial axis (``lax.padtype_to_pads``)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Module):
    """Conv2d with XLA "SAME" padding and optional input / kernel quantizers."""

    def __init__(self, cin, cout, kernel, stride=1, bias=False, input_q=None, kernel_q=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, 0, bias=bias)
        self.kernel, self.stride = kernel, stride
        self.input_q, self.kernel_q = input_q, kernel_q

    def forward(self, x):
        x = _quantize_input(x, self.input_q)
        w = _quantize_kernel(self.conv.weight, self.kernel_q)
        ph = same_pads(x.shape[2], self.kernel, self.stride)
        pw = same_pads(x.shape[3], self.kernel, self.stride)
        if ph[0] == ph[1] and pw[0] == pw[1]:
            return F.conv2d(x, w, self.conv.bias, self.stride, (ph[0], pw[0]))
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return F.conv2d(x, w, self.conv.bias, self.stride, 0)


def _pool_same(x: torch.Tensor, kernel: int, stride: int, kind: str) -> torch.Tensor:
    ph = same_pads(x.shape[2], kernel, stride)
    pw = same_pads(x.shape[3], kernel, stride)
    if ph[0] == 0 and pw[0] == 0:  # only trailing padding: ceil_mode pads at the end
        if kind == "max":
            return F.max_pool2d(x, kernel, stride, ceil_mode=True)
        return F.avg_pool2d(x, kernel, stride, ceil_mode=True, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=-math.inf), kernel, stride)
    pad = (pw[0], pw[1], ph[0], ph[1])
    total = F.avg_pool2d(F.pad(x, pad), kernel, stride, divisor_override=1)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    count = F.avg_pool2d(F.pad(ones, pad), kernel, stride, divisor_override=1)
    return total / count


# --------------------------------------------------------------------------- blocks
class ShortcutBlock(nn.Module):
    """jbnn.models.birealnet.ShortcutBlock: ``BN(QuantConv(act(x))) + shortcut(x)``."""

    def __init__(self, cin, cout, stride, binary, input_q, kernel_q, eps, fp_activation):
        super().__init__()
        self.binary, self.stride, self.fp_activation = binary, stride, fp_activation
        self.conv = SameConv2d(
            cin,
            cout,
            3,
            stride,
            input_q=input_q if binary else None,
            kernel_q=kernel_q if binary else None,
        )
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.down = cin != cout or stride != 1
        if self.down:
            self.shortcut_conv = SameConv2d(cin, cout, 1, 1)
            self.shortcut_bn = nn.BatchNorm2d(cout, eps=eps)

    def forward(self, x):
        shortcut = x
        if self.down:
            if self.stride != 1:
                shortcut = _pool_same(shortcut, self.stride, self.stride, "avg")
            shortcut = self.shortcut_bn(self.shortcut_conv(shortcut))
        h = x if self.binary else _ACTIVATIONS[self.fp_activation](x)
        return self.bn(self.conv(h)) + shortcut


_ACTIVATIONS = {
    "hard_tanh": F.hardtanh,
    "relu": F.relu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


class ShortcutNet18(nn.Module):
    """BiRealNet18 (``kind="birealnet18"``) or BinaryResNetE18 (``"binary_resnet_e18"``)."""

    def __init__(self, kind, num_classes, binary, width, stem, input_q, kernel_q, fp_activation):
        super().__init__()
        self.kind, self.stem_kind = kind, stem
        eps = 1e-3 if kind == "birealnet18" else 1e-5
        c = lambda ch: max(8, int(round(ch * width)))
        imagenet = stem == "imagenet"
        self.stem_conv = SameConv2d(3, c(64), 7 if imagenet else 3, 2 if imagenet else 1)
        self.stem_bn = nn.BatchNorm2d(c(64), eps=eps)
        if kind == "binary_resnet_e18":
            self.stem_bn2 = nn.BatchNorm2d(c(64), eps=eps)
        stages, cin = [], c(64)
        for i, ch in enumerate((64, 128, 256, 512)):
            blocks = []
            for j in range(4):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    ShortcutBlock(cin, c(ch), stride, binary, input_q, kernel_q, eps, fp_activation)
                )
                cin = c(ch)
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem_conv(x)
        if self.kind == "birealnet18":
            x = self.stem_bn(x)
            if self.stem_kind == "imagenet":
                x = _pool_same(x, 3, 2, "max")
        elif self.stem_kind == "imagenet":  # binary_resnet_e18's stem
            x = F.relu(self.stem_bn(x))
            x = self.stem_bn2(_pool_same(x, 3, 2, "max"))
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        if self.kind == "binary_resnet_e18":
            x = F.relu(x)
        return self.head(x.mean(dim=(2, 3)))


class PlainBlock(nn.Module):
    """benchmarks.plain_resnet.BasicBlock."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = SameConv2d(cin, cout, 3, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = SameConv2d(cout, cout, 3, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = cin != cout or stride != 1
        if self.down:
            self.shortcut_conv = SameConv2d(cin, cout, 1, stride)
            self.shortcut_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        r = self.shortcut_bn(self.shortcut_conv(x)) if self.down else x
        return F.relu(y + r)


class PlainResNet18(nn.Module):
    """benchmarks.plain_resnet.ResNet18 (torchvision's layout, XLA "SAME" padding)."""

    def __init__(self, num_classes):
        super().__init__()
        self.stem_conv = SameConv2d(3, 64, 7, 2)
        self.stem_bn = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, ch in enumerate((64, 128, 256, 512)):
            blocks = [PlainBlock(cin, ch, 2 if i > 0 else 1), PlainBlock(ch, ch, 1)]
            cin = ch
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        x = _pool_same(F.relu(self.stem_bn(self.stem_conv(x))), 3, 2, "max")
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.head(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- weights
def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _load_conv(conv: SameConv2d, p: dict) -> None:
    conv.conv.weight.data.copy_(_t(p["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
    if "bias" in p:
        conv.conv.bias.data.copy_(_t(p["bias"]))


def _load_bn(bn: nn.BatchNorm2d, p: dict, s: dict) -> None:
    bn.weight.data.copy_(_t(p["scale"]))
    bn.bias.data.copy_(_t(p["bias"]))
    bn.running_mean.data.copy_(_t(s["mean"]))
    bn.running_var.data.copy_(_t(s["var"]))


def _load_head(head: nn.Linear, p: dict) -> None:
    head.weight.data.copy_(_t(p["kernel"]).T)
    head.bias.data.copy_(_t(p["bias"]))


def _load_stages(tm: nn.Module, params: dict, stats: dict, plain: bool) -> None:
    for i in range(1, 5):
        stage = getattr(tm, f"stage{i}")
        for j, block in enumerate(stage, start=1):
            p, s = params[f"stage{i}"][f"block{j}"], stats[f"stage{i}"][f"block{j}"]
            if plain:
                _load_conv(block.conv1, p["conv1"])
                _load_bn(block.bn1, p["bn1"], s["bn1"])
                _load_conv(block.conv2, p["conv2"])
                _load_bn(block.bn2, p["bn2"], s["bn2"])
            else:
                _load_conv(block.conv, p["conv"])
                _load_bn(block.bn, p["bn"], s["bn"])
            if block.down:
                _load_conv(block.shortcut_conv, p["shortcut_conv"])
                _load_bn(block.shortcut_bn, p["shortcut_bn"], s["shortcut_bn"])


def port(name: str, model, variables, channels_last: bool = False) -> nn.Module:
    """The torch module computing ``model.apply(variables, x)`` (inference mode).

    Args:
      name: ``"birealnet18"``, ``"binary_resnet_e18"`` or ``"resnet18"`` (plain).
      model: the Flax module (its fields give binary / width / stem / quantizers).
      variables: its variables (``params`` and ``batch_stats``).
      channels_last: convert the module to torch's channels-last memory format.

    Returns:
      A torch module in eval mode whose parameters do not require gradients (Captum
      only needs input gradients), taking NCHW float32 images.
    """
    params, stats = variables["params"], variables["batch_stats"]
    if name == "resnet18":
        tm = PlainResNet18(model.num_classes)
        _load_conv(tm.stem_conv, params["stem_conv"])
        _load_bn(tm.stem_bn, params["stem_bn"], stats["stem_bn"])
        _load_stages(tm, params, stats, plain=True)
    elif name in ("birealnet18", "binary_resnet_e18"):
        tm = ShortcutNet18(
            name,
            model.num_classes,
            model.binary,
            model.width,
            model.stem,
            model.input_quantizer,
            model.kernel_quantizer,
            model.fp_activation,
        )
        if getattr(model, "surrogate", None) is not None:
            raise ValueError("torch port: surrogate overrides are not ported")
        _load_conv(tm.stem_conv, params["stem"]["conv"])
        if "bn" in params["stem"]:
            _load_bn(tm.stem_bn, params["stem"]["bn"], stats["stem"]["bn"])
        if "bn2" in params["stem"]:
            _load_bn(tm.stem_bn2, params["stem"]["bn2"], stats["stem"]["bn2"])
        _load_stages(tm, params, stats, plain=False)
    else:
        raise ValueError(f"torch port: unknown model {name!r}")
    _load_head(tm.head, params["head"])
    tm.eval().requires_grad_(False)
    if channels_last:
        tm = tm.to(memory_format=torch.channels_last)
    return tm


def to_torch_images(x, channels_last: bool = False) -> torch.Tensor:
    """NHWC array -> NCHW float32 torch tensor (channels-last memory if asked)."""
    t = torch.from_numpy(np.array(x, dtype=np.float32)).permute(0, 3, 1, 2)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return t.contiguous(memory_format=layout)


def logit_errors(model, variables, torch_model: nn.Module, x) -> np.ndarray:
    """Per example: max |logits_flax - logits_torch| / max(1, max |logits_flax|), (B,)."""
    ref = np.asarray(model.apply(variables, x))
    with torch.no_grad():
        got = torch_model(to_torch_images(x)).numpy()
    return np.max(np.abs(ref - got), axis=1) / np.maximum(1.0, np.max(np.abs(ref), axis=1))


def check_port(errors: np.ndarray, binary: bool, tol: float = 1e-4) -> str:
    """Whether the port computes the model; raises a ValueError when it does not.

    A twin must agree on every example. A BNN is discontinuous: where a pre-activation
    lies within float rounding of 0, the two frameworks' sums (summed in another order)
    can binarize to different signs and the logits of that example then differ for
    real; such an example is reported, but the majority of examples must agree.

    Returns:
      A one-line summary.
    """
    bad = np.nonzero(errors > tol)[0]
    summary = f"max relative logit error {np.max(errors):.2e}"
    if len(bad) and (not binary or 2 * len(bad) > len(errors)):
        raise ValueError(f"the torch port disagrees: {summary} (examples {bad.tolist()})")
    if len(bad):
        good = np.max(np.delete(errors, bad))
        summary = (
            f"max relative logit error {good:.2e} on {len(errors) - len(bad)} of "
            f"{len(errors)} examples; example(s) {bad.tolist()} differ by up to "
            f"{np.max(errors[bad]):.1e} (a binarized activation within float rounding of "
            "0 takes the other sign)"
        )
    return summary
