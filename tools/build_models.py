#!/usr/bin/env python3
"""Build the demo models of edge-agent: train, export, verify, write model cards.

Trains two image classifiers on scikit-learn's digits (the dataset ships inside the
scikit-learn wheel; nothing is downloaded), seen as camera-like frames made by
``agent.models.digits.frames_from_digits``:

* ``mobilenet_digits``: a reduced MobileNetV2 (inverted residual blocks, depthwise
  separable convolutions, ReLU6): the cheap model.
* ``resnet_digits``: a small ResNet (basic residual blocks): the larger one.

Both take ``frames`` uint8 NHWC ``[N, 64, 64, 3]`` (the cast, x/255, mean/std and the
NHWC->NCHW transpose are inside the graph) and give ``logits`` float32 ``[N, 10]``, with a
dynamic batch dimension. Each is exported to ONNX (one file), to .tflite float32 and to
.tflite int8 (post-training static quantisation, PT2E, calibrated on the TRAIN split), and
every file is run on the whole test split by the runtime the agent uses (onnxruntime,
ai_edge_litert). Batch-norm is folded into the convolutions before export.

``--models camera_digits`` (built only when named) trains the camera-sized model instead: the
same digits as 160x160 frames from ``agent.models.digits.camera_frames`` (scale, position,
background, tint, blur, occlusion, noise), a ResNet that downsamples early, ONNX only; it leaves
the demo models' files and ``digits_test.npz`` alone (its test set is that file plus a seed).

``--models camera_exits`` (built only when named) trains the multi-exit model of issue 24: a smaller
camera-frame ResNet with early-exit heads after stage1 and stage2, trained jointly; exported whole (every
exit's logits) and cut at the exits into stages that continue one another (``tools/split_models.py``
``cut_exit_stages``), with a calibration split held out from training (``camera_exits_calib.npz``); its
card's ``exits`` hold each exit's test accuracy, confidence calibration and stage times.

Outputs go to ``agent/models/demo/``: the model files, ``digits_test.npz`` (the test split's
8x8 images and labels) and one JSON model card per model.

Run through ``tools/build_models.sh`` (it makes the tools venv). CPU only, 2 threads.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import datetime as _dt
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Quieter converters (set before they are imported): no litert-torch progress trees,
# no TensorFlow/absl info lines.
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.models.digits import LABELS, frames_from_digits  # noqa: E402  (numpy only)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SEED = 0
NUM_CLASSES = 10
OPSET = 18  # the torch.export-based exporter's native opset (17 fails its down-conversion)
DEMO_DIR = REPO / "agent" / "models" / "demo"


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------

def load_split(seed: int = SEED):
    """sklearn digits, stratified 80/20 split. Returns uint8 8x8 images and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images).astype(np.uint8)  # integer-valued 0..16
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=0.2, stratify=labels, random_state=seed)
    tr.sort()
    te.sort()
    return images[tr], labels[tr], images[te], labels[te]


def augment(frames_nhwc: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine (shift, scale, rotation), gain and noise on float 0..255 NHWC
    frames; returns float NHWC rounded and clamped to 0..255 (what uint8 would carry)."""
    n = frames_nhwc.shape[0]
    x = frames_nhwc.permute(0, 3, 1, 2)
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10.0)
    scale = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * 0.12
    tx = (torch.rand(n, generator=gen) * 2 - 1) * 0.14  # +-0.14 of half-width = +-4.5 px
    ty = (torch.rand(n, generator=gen) * 2 - 1) * 0.14
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.2
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 8.0
    x = x * gain + torch.randn(x.shape, generator=gen) * sigma
    x = x.clamp(0.0, 255.0).round()
    return x.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

class FramePrep(nn.Module):
    """uint8 NHWC frames -> normalised float32 NCHW: (x/255 - mean) / std per channel.

    The per-channel affine map is a fixed (non-trained) 1x1 depthwise convolution: it is
    exactly x * (1/(255 std)) + (-mean/std), and unlike a broadcast Mul/Add it converts
    with a dynamic batch dimension (litert-torch 0.10 lowers broadcasting element-wise
    ops through JAX, which rejects a dynamic dimension)."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(3, 1, 1, 1))
        self.register_buffer("shift", (-mean / std).view(3))

    def forward(self, frames):
        x = frames.to(torch.float32).permute(0, 3, 1, 2)
        return F.conv2d(x, self.scale, self.shift, groups=3)


class ConvBNAct(nn.Module):
    """Conv2d + BatchNorm2d (+ ReLU / ReLU6). ``fuse()`` folds BN into the conv."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act: str | None = "relu6"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = {"relu6": nn.ReLU6(), "relu": nn.ReLU(), None: nn.Identity()}[act]

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self):
        if isinstance(self.bn, nn.Identity):
            return
        w, bn = self.conv.weight, self.bn
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = nn.Conv2d(
            self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size,
            self.conv.stride, self.conv.padding, groups=self.conv.groups, bias=True,
        )
        conv.weight.copy_(w * s.view(-1, 1, 1, 1))
        b = self.conv.bias if self.conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias.copy_((b - bn.running_mean) * s + bn.bias)
        self.conv = conv
        self.bn = nn.Identity()


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear project."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
            ConvBNAct(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetDigits(nn.Module):
    """Reduced MobileNetV2 for 64x64 frames (width and depth cut for 8x8-sourced digits)."""

    # (expand t, out channels c, repeats n, first stride s) per stage, as in the paper's table
    STAGES = {
        "stage1": [(1, 24, 1, 1)],                  # 32x32
        "stage2": [(6, 32, 2, 2)],                  # 16x16
        "stage3": [(6, 48, 3, 2)],                  # 8x8
        "stage4": [(6, 64, 3, 2), (6, 96, 2, 1)],   # 4x4
    }
    STEM = 24
    HEAD = 256

    def __init__(self, mean, std, stages=None, stem=None, head=None, stem_stride=2):
        super().__init__()
        self.STAGES = stages or self.STAGES
        self.STEM = stem or self.STEM
        self.HEAD = head or self.HEAD
        self.prep = FramePrep(mean, std)
        self.stem = ConvBNAct(3, self.STEM, 3, stem_stride)
        cin = self.STEM
        for name, cfg in self.STAGES.items():
            blocks = []
            for t, c, n, s in cfg:
                for i in range(n):
                    blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            setattr(self, name, nn.Sequential(*blocks))
        self.head = ConvBNAct(cin, self.HEAD, 1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(self.HEAD, NUM_CLASSES)

    def forward(self, frames):
        x = self.stem(self.prep(frames))
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.head(x)
        x = x.mean((2, 3))  # global average pool; no batch-size-dependent reshape
        return self.classifier(self.dropout(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs, identity or 1x1-projection shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride, act="relu")
        self.conv2 = ConvBNAct(cout, cout, 3, 1, act=None)
        self.shortcut = (
            ConvBNAct(cin, cout, 1, stride, act=None)
            if (stride != 1 or cin != cout) else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetDigits(nn.Module):
    """Small ResNet for 64x64 frames: 3x3 stem (stride 2), three stages of basic blocks."""

    STEM = 32
    STAGES = {"stage1": (48, 3, 1), "stage2": (64, 2, 2), "stage3": (96, 2, 2)}  # (c, n, s)

    def __init__(self, mean, std, stages=None, stem=None, stem_stride=2):
        super().__init__()
        self.STAGES = stages or self.STAGES
        self.STEM = stem or self.STEM
        self.prep = FramePrep(mean, std)
        self.stem = ConvBNAct(3, self.STEM, 3, stem_stride, act="relu")
        cin = self.STEM
        for name, (c, n, s) in self.STAGES.items():
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, c, s if i == 0 else 1))
                cin = c
            setattr(self, name, nn.Sequential(*blocks))
        self.classifier = nn.Linear(cin, NUM_CLASSES)

    def forward(self, frames):
        x = self.stem(self.prep(frames))
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = x.mean((2, 3))  # global average pool; no batch-size-dependent reshape
        return self.classifier(x)


class CameraResNet(nn.Module):
    """ResNet for 160x160 camera frames that downsamples early (two stride-2 3x3 convs, 160 -> 40)
    so that it trains in minutes on a CPU, then four stages of basic blocks (40, 20, 10, 5 px)."""

    STAGES = {"stage1": (64, 3, 1), "stage2": (96, 2, 2), "stage3": (160, 2, 2), "stage4": (256, 1, 2)}

    def __init__(self, mean, std):
        super().__init__()
        self.prep = FramePrep(mean, std)
        self.stem = nn.Sequential(ConvBNAct(3, 24, 3, 2, act="relu"), ConvBNAct(24, 32, 3, 2, act="relu"))
        cin = 32
        for name, (c, n, s) in self.STAGES.items():
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, c, s if i == 0 else 1))
                cin = c
            setattr(self, name, nn.Sequential(*blocks))
        self.classifier = nn.Linear(cin, NUM_CLASSES)

    def forward(self, frames):
        x = self.stem(self.prep(frames))
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = x.mean((2, 3))
        return self.classifier(x)


class ExitHead(nn.Module):
    """An early exit's classifier (BranchyNet / shallow-deep-network style): ``downsample`` 3x3
    stride-2 convs (ReLU) or, with none, a 1x1 conv (ReLU); then a global average pool and a linear
    layer. Small next to the stage it follows. An exit right after an early stage sees only what that
    stage's receptive field covers (about 40 px after stage1, on digits 72-144 px tall): with a 1x1
    conv only, exit1 reached 44% top-1; two stride-2 convs widen its view at about a tenth of
    stage1's cost."""

    def __init__(self, cin, width, downsample: int = 0):
        super().__init__()
        layers, c = [], cin
        for i in range(downsample):
            out = width if i == downsample - 1 else (cin + width) // 2
            layers.append(ConvBNAct(c, out, 3, 2, act="relu"))
            c = out
        self.conv = nn.Sequential(*layers) if layers else ConvBNAct(cin, width, 1, act="relu")
        self.fc = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class CameraExitNet(nn.Module):
    """A small ResNet for 160x160 camera frames with two early exits: the early-downsampling stem of
    :class:`CameraResNet` (160 -> 40), three stages of basic blocks (40, 20, 10 px) and an exit head
    after stage1 and after stage2 beside the final classifier. ``forward`` returns every exit's logits,
    earliest first, so the exported graph computes them all and stages cut from it continue one
    another (``camera_exits.stage<k>.onnx``)."""

    STAGES = {"stage1": (32, 2, 1), "stage2": (64, 2, 2), "stage3": (128, 2, 2)}   # (c, n, s)
    EXIT_WIDTH = {"stage1": 64, "stage2": 64}

    def __init__(self, mean, std):
        super().__init__()
        self.prep = FramePrep(mean, std)
        self.stem = nn.Sequential(ConvBNAct(3, 16, 3, 2, act="relu"), ConvBNAct(16, 32, 3, 2, act="relu"))
        cin = 32
        for name, (c, n, s) in self.STAGES.items():
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, c, s if i == 0 else 1))
                cin = c
            setattr(self, name, nn.Sequential(*blocks))
        self.exit1 = ExitHead(self.STAGES["stage1"][0], self.EXIT_WIDTH["stage1"], downsample=2)
        self.exit2 = ExitHead(self.STAGES["stage2"][0], self.EXIT_WIDTH["stage2"])
        self.classifier = nn.Linear(cin, NUM_CLASSES)

    def forward(self, frames):
        f1 = self.stage1(self.stem(self.prep(frames)))
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        return self.exit1(f1), self.exit2(f2), self.classifier(f3.mean((2, 3)))


MODELS = {
    "mobilenet_digits": dict(
        cls=MobileNetDigits,
        architecture=(
            "MobileNetV2-style (reduced): in-graph uint8 NHWC -> x/255, (x-mean)/std (fixed 1x1 "
            "depthwise conv) -> NCHW; 3x3 conv stem 24 ch stride 2 + ReLU6; inverted residual "
            "blocks (1x1 expand ReLU6, 3x3 depthwise ReLU6, 1x1 linear projection, residual "
            "where shapes match) with t,c,n,s = stage1 [1,24,1,1] (32x32), stage2 [6,32,2,2] "
            "(16x16), stage3 [6,48,3,2] (8x8), stage4 [6,64,3,2]+[6,96,2,1] (4x4); 1x1 conv 256 "
            "ReLU6; global average pool; dropout; linear 10. BN folded into the convs at export."
        ),
        split_points=["stage1", "stage2", "stage3", "stage4"],
        epochs=20, lr=4e-3, wd=4e-5,
    ),
    "resnet_digits": dict(
        cls=ResNetDigits,
        architecture=(
            "ResNet-style: in-graph uint8 NHWC -> x/255, (x-mean)/std (fixed 1x1 depthwise "
            "conv) -> NCHW; 3x3 conv stem 32 ch stride 2 + ReLU; basic residual blocks "
            "(3x3 conv ReLU, 3x3 conv, identity or 1x1-projection shortcut, add, ReLU): "
            "stage1 3 blocks x 48 ch (32x32), stage2 2 blocks x 64 ch (16x16), stage3 2 blocks "
            "x 96 ch (8x8); global average pool; linear 10. BN folded into the convs at export."
        ),
        split_points=["stem", "stage1", "stage2", "stage3"],
        epochs=15, lr=3e-3, wd=5e-4,
    ),
}


def fuse_bn(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(mod, ConvBNAct):
            mod.fuse()
    return m


def count_flops(model: nn.Module, size: int = 64) -> int:
    """FLOPs for one image by torch.utils.flop_counter (conv + linear, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return int(fc.get_total_flops())


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------

def train_model(name, model, xtr, ytr, xte, yte, epochs, lr, wd, batch=64, seed=SEED):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    xtr_t = torch.from_numpy(xtr).to(torch.float32)
    ytr_t = torch.from_numpy(ytr)
    t0 = time.time()
    for ep in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr_t), generator=gen)
        tot, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            xb = augment(xtr_t[idx], gen)
            yb = ytr_t[idx]
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            tot += len(idx)
            if (i // batch) % 20 == 19:
                log(f"    step {i // batch + 1}: loss {loss_sum / tot:.4f} train acc {correct / tot:.4f} "
                    f"{time.time() - t0:6.1f}s")
        te_acc = evaluate_torch(model, xte, yte)
        log(f"  [{name}] epoch {ep:3d}/{epochs}  loss {loss_sum / tot:.4f}  "
            f"train(aug) acc {correct / tot:.4f}  test acc {te_acc:.4f}  "
            f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.1f}s")
    model.eval()
    return model


@torch.no_grad()
def predict_torch(model, x_uint8: np.ndarray, batch=256) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(x_uint8[i:i + batch])).numpy()
            for i in range(0, len(x_uint8), batch)]
    return np.concatenate(outs)


def evaluate_torch(model, x, y) -> float:
    return float((predict_torch(model, x).argmax(1) == y).mean())


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path: Path, size: int = 64, output_names: tuple[str, ...] = ("logits",)) -> None:
    """torch.export-based ONNX export, one file, dynamic batch axis."""
    import logging

    import onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    sample = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("N", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (sample,), None, input_names=["frames"], output_names=list(output_names),
            dynamic_shapes={"frames": {0: batch}}, opset_version=OPSET, dynamo=True,
            external_data=False, verbose=False,
        )
    prog.optimize()
    proto = prog.model_proto
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def _scope_of(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return list(ast.literal_eval(p.value))
    return []


def name_split_points(path: Path, modules: list[str]) -> dict[str, dict]:
    """Find the output tensor of each named top-level module in the exported ONNX graph
    (by the exporter's name-scope metadata), rename it to ``<module>_out`` and check it.

    Returns {module: {"onnx_tensor": name, "shape": [...]}}."""
    import onnx
    from onnx import shape_inference

    proto = onnx.load(str(path))
    g = proto.graph
    found = {}
    for mod in modules:
        inside = [n for n in g.node if (_scope_of(n)[1:2] == [mod])]
        if not inside:
            raise RuntimeError(f"{path.name}: no ONNX node carries the name scope {mod!r}")
        produced = {o for n in inside for o in n.output}
        consumed_outside = {
            i for n in g.node if n not in inside for i in n.input if i in produced
        } | {o.name for o in g.output if o.name in produced}
        if len(consumed_outside) != 1:
            raise RuntimeError(
                f"{path.name}: module {mod!r} has {len(consumed_outside)} outputs "
                f"used outside it: {sorted(consumed_outside)}"
            )
        old = consumed_outside.pop()
        new = f"{mod}_out"
        for n in g.node:
            n.input[:] = [new if i == old else i for i in n.input]
            n.output[:] = [new if o == old else o for o in n.output]
        for vi in g.value_info:
            if vi.name == old:
                vi.name = new
        found[mod] = new
    # drop the exporter's per-node debug metadata (stack traces, local paths): bytes only
    for n in g.node:
        del n.metadata_props[:]
    for v in list(g.input) + list(g.output) + list(g.value_info):
        del v.metadata_props[:]
    onnx.checker.check_model(proto)
    inferred = shape_inference.infer_shapes(proto)
    shapes = {}
    for vi in inferred.graph.value_info:
        dims = [d.dim_value if d.HasField("dim_value") else -1
                for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    out = {}
    for mod, tname in found.items():
        if tname not in shapes:
            raise RuntimeError(f"{path.name}: tensor {tname!r} has no inferred shape")
        out[mod] = {"onnx_tensor": tname, "shape": shapes[tname]}
    path.write_bytes(proto.SerializeToString())
    return out


def check_split_points(path: Path, splits: dict[str, dict], x: np.ndarray) -> float:
    """Cut the graph at each split tensor (onnx.utils.extract_model), run head then tail with
    onnxruntime, compare with the whole graph. Returns the worst max abs difference."""
    import onnx
    import onnx.utils

    full = ort_predict(path, x)
    worst = 0.0
    with tempfile.TemporaryDirectory() as td:
        for mod, sp in splits.items():
            head, tail = Path(td) / f"{mod}_head.onnx", Path(td) / f"{mod}_tail.onnx"
            onnx.utils.extract_model(str(path), str(head), ["frames"], [sp["onnx_tensor"]])
            onnx.utils.extract_model(str(path), str(tail), [sp["onnx_tensor"]], ["logits"])
            mid = ort_predict(head, x, output=sp["onnx_tensor"])
            exp = list(sp["shape"])
            if list(mid.shape[1:]) != exp[1:]:
                raise RuntimeError(f"split {mod}: head gives {mid.shape}, card says {exp}")
            out = ort_predict(tail, mid, input_name=sp["onnx_tensor"])
            worst = max(worst, float(np.abs(out - full).max()))
    return worst


def ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_predict(path: Path, x: np.ndarray, batch=256, input_name="frames", output=None):
    sess = ort_session(path, threads=2)
    outs = []
    for i in range(0, len(x), batch):
        outs.append(sess.run([output] if output else None, {input_name: x[i:i + batch]})[0])
    return np.concatenate(outs)


class NamedIO(nn.Module):
    """Signature wrapper for litert-torch: the keyword input ``frames`` and a dict output
    ``{"logits": ...}`` name the tflite signature's input and output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, frames):
        return {"logits": self.model(frames)}


def export_tflite(model: nn.Module, path: Path, quant_frames: np.ndarray | None = None) -> None:
    """litert-torch conversion, dynamic batch, signature ``frames`` -> ``logits``.

    With quant_frames: PT2E static int8 post-training quantisation (per-channel symmetric
    weights, per-tensor affine activations) calibrated on those frames. The final linear
    layer stays float so that ``logits`` come out as float32 like the other files."""
    import litert_torch

    wrapped = NamedIO(model).eval()
    kwargs = {"frames": torch.zeros(2, 64, 64, 3, dtype=torch.uint8)}
    dyn = {"frames": {0: torch.export.Dim("batch", min=1, max=4096)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if quant_frames is None:
            edge = litert_torch.convert(wrapped, (), kwargs, dynamic_shapes=dyn)
        else:
            from litert_torch.quantize import pt2e_quantizer as pq
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e

            quantizer = (
                pq.PT2EQuantizer()
                .set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
            )
            # Leave the classifier (nn.Linear) in float so that logits come out float32. The
            # quantizer's filter compares against torch.export's nn_module_stack, which
            # holds the type as a string in torch 2.13 (the class too, for older versions).
            for tp in (nn.Linear, f"{nn.Linear.__module__}.{nn.Linear.__qualname__}"):
                quantizer.set_module_type(tp, None)
            exported = torch.export.export(wrapped, (), kwargs, dynamic_shapes=dyn).module()
            prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
            with torch.no_grad():
                for i in range(0, len(quant_frames), 64):
                    prepared(frames=torch.from_numpy(quant_frames[i:i + 64]))
            converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            converted = move_exported_model_to_eval(converted)  # dropout etc. in eval form
            for mod in converted.modules():  # (an exported GraphModule refuses .eval())
                mod.training = False
            edge = litert_torch.convert(
                converted, (), kwargs, dynamic_shapes=dyn,
                quant_config=QuantConfig(pt2e_quantizer=quantizer),
            )
    edge.export(str(path))


def tflite_interpreter(path: Path, threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=threads)


def tflite_predict(path: Path, x: np.ndarray, batch=64) -> np.ndarray:
    it = tflite_interpreter(path, threads=2)
    inp = it.get_input_details()[0]
    out_i = it.get_output_details()[0]["index"]
    outs, cur = [], None
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if cur != len(xb):
            it.resize_tensor_input(inp["index"], [len(xb), 64, 64, 3])
            it.allocate_tensors()
            cur = len(xb)
        it.set_tensor(inp["index"], xb)
        it.invoke()
        outs.append(it.get_tensor(out_i).copy())
    return np.concatenate(outs)


def check_io(kind: str, path: Path) -> None:
    """The input/output contract: frames uint8 [-1,64,64,3] -> logits float32 [-1,10]."""
    if kind == "onnx":
        sess = ort_session(path)
        (i,), (o,) = sess.get_inputs(), sess.get_outputs()
        got = ((i.name, i.type, [d if isinstance(d, int) else -1 for d in i.shape]),
               (o.name, o.type, [d if isinstance(d, int) else -1 for d in o.shape]))
        want = (("frames", "tensor(uint8)", [-1, 64, 64, 3]),
                ("logits", "tensor(float)", [-1, 10]))
    else:
        it = tflite_interpreter(path)
        (i,), (o,) = it.get_input_details(), it.get_output_details()
        sig = it.get_signature_list()
        got = (("serving_default", sig["serving_default"]["inputs"],
                sig["serving_default"]["outputs"]),
               (str(np.dtype(i["dtype"])), [int(v) for v in i["shape_signature"]]),
               str(np.dtype(o["dtype"])))
        want = (("serving_default", ["frames"], ["logits"]),
                ("uint8", [-1, 64, 64, 3]), "float32")
    if got != want:
        raise RuntimeError(f"{path.name}: io contract: got {got}, want {want}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    h.update(path.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# latency (informative; single thread)
# --------------------------------------------------------------------------------------

def bench_ms_per_image(kind: str, path: Path, x: np.ndarray, batch: int, reps: int) -> float:
    xb = x[:batch]
    if kind == "onnx":
        sess = ort_session(path, threads=1)
        run = lambda: sess.run(None, {"frames": xb})  # noqa: E731
    else:
        it = tflite_interpreter(path, threads=1)
        idx = it.get_input_details()[0]["index"]
        it.resize_tensor_input(idx, [batch, 64, 64, 3])
        it.allocate_tensors()
        it.set_tensor(idx, xb)
        run = it.invoke
    for _ in range(10):
        run()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1000.0 / batch


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def build_one(name, spec, data, args, mean, std, out_dir: Path) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(SEED)
    model = spec["cls"](mean, std)
    epochs = args.epochs if args.epochs else spec["epochs"]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"\n=== {name}: {n_params} parameters, {epochs} epochs ===")
    model = train_model(name, model, xtr, ytr, xte, yte, epochs, spec["lr"], spec["wd"])
    acc_torch = evaluate_torch(model, xte, yte)
    fused = fuse_bn(model)
    logits_torch = predict_torch(fused, xte)
    fused_diff = float(np.abs(logits_torch - predict_torch(model, xte)).max())
    log(f"  torch test acc {acc_torch:.4f}; BN folded: max |diff| {fused_diff:.2e}")
    n_params_fused = sum(p.numel() for p in fused.parameters())
    flops = count_flops(fused)

    files = {}
    # --- ONNX
    onnx_path = out_dir / f"{name}.onnx"
    log(f"  exporting {onnx_path.name} (opset {OPSET}) ...")
    export_onnx(fused, onnx_path)
    splits = name_split_points(onnx_path, spec["split_points"])
    logits_onnx = ort_predict(onnx_path, xte)
    onnx_diff = float(np.abs(logits_onnx - logits_torch).max())
    split_diff = check_split_points(onnx_path, splits, xte[:64])
    check_io("onnx", onnx_path)
    files["onnx"] = {"path": onnx_path.name, "logits": logits_onnx,
                     "max_abs_diff_vs_torch": onnx_diff}
    log(f"  onnx: max |onnx - torch| {onnx_diff:.2e}; split head+tail vs whole {split_diff:.2e}")
    if onnx_diff > 1e-3:
        raise RuntimeError(f"{name}: onnxruntime and torch disagree by {onnx_diff}")
    if split_diff > 1e-4:
        raise RuntimeError(f"{name}: split graphs disagree with the whole by {split_diff}")

    # --- tflite float32
    tfl_path = out_dir / f"{name}.tflite"
    log(f"  converting {tfl_path.name} (float32) ...")
    export_tflite(fused, tfl_path)
    logits_tfl = tflite_predict(tfl_path, xte)
    tfl_diff = float(np.abs(logits_tfl - logits_torch).max())
    files["tflite"] = {"path": tfl_path.name, "logits": logits_tfl,
                       "max_abs_diff_vs_torch": tfl_diff}
    check_io("tflite", tfl_path)
    log(f"  tflite: max |tflite - torch| {tfl_diff:.2e}")
    if tfl_diff > 1e-3:
        raise RuntimeError(f"{name}: LiteRT float model and torch disagree by {tfl_diff}")

    # --- tflite int8 (PT2E static, calibrated on the train split)
    q_path = out_dir / f"{name}_int8.tflite"
    log(f"  converting {q_path.name} (int8 PTQ, {args.calib} train frames) ...")
    rng = np.random.default_rng(SEED)
    calib = xtr[np.sort(rng.choice(len(xtr), size=min(args.calib, len(xtr)), replace=False))]
    export_tflite(fused, q_path, quant_frames=calib)
    logits_q = tflite_predict(q_path, xte)
    files["tflite_int8"] = {"path": q_path.name, "logits": logits_q,
                            "max_abs_diff_vs_torch": float(np.abs(logits_q - logits_torch).max()),
                            "quantization": "PT2E static int8: per-channel symmetric weights, "
                                            "per-tensor affine activations (histogram observer), "
                                            f"calibrated on {len(calib)} train-split frames"}
    check_io("tflite", q_path)
    log(f"  tflite int8: max |int8 - torch| {files['tflite_int8']['max_abs_diff_vs_torch']:.3f}")

    card_files = {}
    for key, f in files.items():
        p = out_dir / f["path"]
        acc = float((f.pop("logits").argmax(1) == yte).mean())
        entry = {"path": f["path"], "sha256": sha256(p), "bytes": p.stat().st_size,
                 "accuracy": round(acc, 4)}
        entry.update({k: v for k, v in f.items() if k != "path"})
        card_files[key] = entry
        log(f"  {f['path']:32s} {entry['bytes']:9d} B  test acc {acc:.4f}")

    lat = {}
    if not args.no_bench:
        for key in ("onnx", "tflite", "tflite_int8"):
            p = out_dir / card_files[key]["path"]
            for b in (1, 8):
                lat[f"{key}_b{b}"] = bench_ms_per_image(
                    "onnx" if key == "onnx" else "tflite", p, xte, b, reps=200 if b == 1 else 50)
        log("  latency ms/image, 1 thread: " + ", ".join(f"{k} {v:.3f}" for k, v in lat.items()))

    card = {
        "card_version": 1,
        "name": name,
        "task": "image-classification",
        "labels": list(LABELS),
        "inputs": [{"name": "frames", "dtype": "uint8", "shape": [-1, 64, 64, 3], "layout": "NHWC"}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
        "files": card_files,
        "dataset": {
            "name": "scikit-learn digits (UCI optdigits test subset)",
            "split": "stratified 80/20, seed 0",
            "test_size": int(len(yte)),
            "preprocess": "agent.models.digits.frames_from_digits",
            "test_file": "digits_test.npz",
        },
        "normalization": {"in_graph": "x/255, then (x - mean)/std per RGB channel, NHWC->NCHW",
                          "mean": [round(float(v), 6) for v in mean],
                          "std": [round(float(v), 6) for v in std]},
        "architecture": spec["architecture"],
        "params": int(n_params_fused),
        "flops_per_image": flops,
        "flops_method": "torch.utils.flop_counter.FlopCounterMode on the BN-folded model at "
                        "batch 1: convolutions and linear layers, 2 FLOPs per multiply-add "
                        "(element-wise ops, pooling and the input cast not counted)",
        # candidates only: tools/split_models.py cuts, checks and times them and moves the ones
        # it ships into split_points (with their head/tail files), which the agent reads
        "split_candidates": [
            {"name": mod, "onnx_tensor": sp["onnx_tensor"], "shape": sp["shape"]}
            for mod, sp in splits.items()
        ],
        "provenance": {
            "tool": "tools/build_models.py",
            "torch": torch.__version__.split("+")[0],
            "seed": SEED,
            "epochs": epochs,
            "built": _dt.date.today().isoformat(),
            "onnx_opset": OPSET,
            "test_accuracy_torch": round(acc_torch, 4),
        },
    }
    if lat:
        card["provenance"]["latency_ms_per_image_1thread_build_host"] = {
            k: round(v, 4) for k, v in lat.items()}
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


CAMERA = dict(
    name="camera_digits",
    architecture=(
        "ResNet-style for camera frames, downsampling early: in-graph uint8 NHWC [N,160,160,3] -> x/255, "
        "(x-mean)/std (fixed 1x1 depthwise conv) -> NCHW; stem: 3x3 conv 24 ch stride 2 + ReLU, 3x3 conv 32 ch "
        "stride 2 + ReLU (40x40); basic residual blocks (3x3 conv ReLU, 3x3 conv, identity or 1x1-projection "
        "shortcut, add, ReLU): stage1 3 blocks x 64 ch (40x40), stage2 2 x 96 (20x20), stage3 2 x 160 (10x10), "
        "stage4 1 x 256 (5x5); global average pool; linear 10. BN folded into the convs at export."),
    split_points=["stem", "stage1", "stage2", "stage3", "stage4"],
    # two draws per train digit, the first at half the difficulty (less blur, noise, occlusion):
    # the network finds the digit on the easier frames first; 3 epochs x 2874 frames fit the
    # ~10-15 minute budget of a shared 2-core CPU
    size=160, train_seeds=(1000, 1001), train_hard=(0.5, 1.0), test_seed=2301, epochs=3, lr=1e-3, wd=5e-4,
    batch=32,
)


def train_on_frames(name: str, model: nn.Module, xtr: np.ndarray, ytr: np.ndarray, epochs: int, spec: dict,
                    loss_fn) -> None:
    """The camera-sized models' training loop: uint8 frames drawn once (no on-line augmentation: the
    draws are the augmentation), AdamW at a constant rate then a linear decay over the last third.
    ``loss_fn(out, labels)`` takes what the model returns; where that is a tuple of exits' logits,
    the last one is what the logged accuracy counts."""
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["wd"])
    batch = spec["batch"]
    steps = epochs * math.ceil(len(xtr) / batch)
    # constant rate, then a linear decay over the last third (a warm-up to a higher peak kept this
    # net at chance for the whole of a budget this short)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, 3.0 * (1.0 - k / steps)))
    gen = torch.Generator().manual_seed(SEED)
    ytr_t = torch.from_numpy(ytr)
    t0 = time.time()
    for ep in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen).numpy()
        tot, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(perm), batch):
            idx = np.sort(perm[i:i + batch])
            xb = torch.from_numpy(xtr[idx]).to(torch.float32)
            yb = ytr_t[idx]
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = out[-1] if isinstance(out, tuple) else out
            loss_sum += loss.item() * len(idx)
            correct += int((last.argmax(1) == yb).sum())
            tot += len(idx)
            if (i // batch) % 20 == 19:
                log(f"    step {i // batch + 1}: loss {loss_sum / tot:.4f} train acc {correct / tot:.4f} "
                    f"{time.time() - t0:6.1f}s")
        log(f"  [{name}] epoch {ep}/{epochs}  loss {loss_sum / tot:.4f}  train acc {correct / tot:.4f}  "
            f"{time.time() - t0:6.1f}s")


def build_camera(args, out_dir: Path) -> dict:
    """The camera-sized model: sklearn digits as 160x160 camera frames (agent.models.digits.camera_frames:
    scale, position, background, tint, blur, occlusion, noise), the train split drawn as a few fixed
    variants per digit, the test split as one fixed draw (its seed is in the card)."""
    from agent.models.digits import camera_frames

    spec = CAMERA
    name, size = spec["name"], spec["size"]
    img_tr, ytr, img_te, yte = load_split()
    t0 = time.time()
    xtr = np.concatenate([camera_frames(img_tr, seed, size, hard=hard)
                          for seed, hard in zip(spec["train_seeds"], spec["train_hard"])])
    ytr_all = np.concatenate([ytr] * len(spec["train_seeds"]))
    xte = camera_frames(img_te, spec["test_seed"], size)
    f = xtr[::7].reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = f.mean(0), f.std(0)
    log(f"\n=== {name}: frames {xtr.shape} train, {xte.shape} test in {time.time() - t0:.0f}s; "
        f"mean {np.round(mean, 4)} std {np.round(std, 4)}")
    torch.manual_seed(SEED)
    model = CameraResNet(mean, std)
    epochs = args.epochs or spec["epochs"]
    t0 = time.time()
    train_on_frames(name, model, xtr, ytr_all, epochs, spec, nn.CrossEntropyLoss())
    model.eval()
    train_s = time.time() - t0
    acc_torch = evaluate_torch(model, xte, yte)
    fused = fuse_bn(model)
    logits_torch = predict_torch(fused, xte)
    onnx_path = out_dir / f"{name}.onnx"
    export_onnx(fused, onnx_path, size=size)
    splits = name_split_points(onnx_path, spec["split_points"])
    logits_onnx = ort_predict(onnx_path, xte)
    onnx_diff = float(np.abs(logits_onnx - logits_torch).max())
    if onnx_diff > 1e-3:
        raise RuntimeError(f"{name}: onnxruntime and torch disagree by {onnx_diff}")
    acc = float((logits_onnx.argmax(1) == yte).mean())
    lat = {} if args.no_bench else {
        f"onnx_b{b}": bench_ms_per_image("onnx", onnx_path, xte, b, reps=60 if b == 1 else 20) for b in (1, 8)}
    log(f"  onnx test acc {acc:.4f} (torch {acc_torch:.4f}), max |onnx - torch| {onnx_diff:.2e}; "
        f"ms/image 1 thread {lat}")
    card = {
        "card_version": 1,
        "name": name,
        "task": "image-classification",
        "labels": list(LABELS),
        "inputs": [{"name": "frames", "dtype": "uint8", "shape": [-1, size, size, 3], "layout": "NHWC"}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
        "files": {"onnx": {"path": onnx_path.name, "sha256": sha256(onnx_path),
                           "bytes": onnx_path.stat().st_size, "accuracy": round(acc, 4),
                           "max_abs_diff_vs_torch": onnx_diff}},
        "dataset": {
            "name": "scikit-learn digits (UCI optdigits test subset) as 160x160 camera frames",
            "split": "stratified 80/20, seed 0 (the demo models' split)",
            "test_size": int(len(yte)),
            "preprocess": "agent.models.digits.camera_frames",
            "test_file": "digits_test.npz",
            "seed": spec["test_seed"],
            "frame_size": size,
            "train": (f"{len(spec['train_seeds'])} camera_frames draws per train digit (seeds "
                      f"{list(spec['train_seeds'])}, hard {list(spec['train_hard'])}), {len(xtr)} frames"),
            "augmentation": "random scale 45-90% of the frame and position, background level and gradient, "
                            "contrast and tint, Gaussian blur sigma 0-2.5 px, occluding rectangle "
                            "(p 0.4, 15-40% of the digit side), Gaussian noise sigma 0-18 (of 255)",
        },
        "normalization": {"in_graph": "x/255, then (x - mean)/std per RGB channel, NHWC->NCHW",
                          "mean": [round(float(v), 6) for v in mean],
                          "std": [round(float(v), 6) for v in std]},
        "architecture": spec["architecture"],
        "params": int(sum(p.numel() for p in fused.parameters())),
        "flops_per_image": count_flops(fused, size),
        "flops_method": "torch.utils.flop_counter.FlopCounterMode on the BN-folded model at batch 1: "
                        "convolutions and linear layers, 2 FLOPs per multiply-add",
        "split_candidates": [
            {"name": mod, "onnx_tensor": sp["onnx_tensor"], "shape": sp["shape"]} for mod, sp in splits.items()
        ],
        "provenance": {
            "tool": "tools/build_models.py --models camera_digits",
            "torch": torch.__version__.split("+")[0],
            "seed": SEED,
            "epochs": epochs,
            "train_seconds_2_threads": round(train_s),
            "built": _dt.date.today().isoformat(),
            "onnx_opset": OPSET,
            "test_accuracy_torch": round(acc_torch, 4),
            "note": "ONNX only (no .tflite variants): it serves as the offload model; not in the demo config",
        },
    }
    if lat:
        card["provenance"]["latency_ms_per_image_1thread_build_host"] = {k: round(v, 4) for k, v in lat.items()}
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


EXITS = dict(
    name="camera_exits",
    architecture=(
        "Multi-exit ResNet-style for camera frames (BranchyNet / shallow-deep-network style): in-graph uint8 NHWC "
        "[N,160,160,3] -> x/255, (x-mean)/std (fixed 1x1 depthwise conv) -> NCHW; stem: 3x3 conv 16 ch stride 2 + "
        "ReLU, 3x3 conv 32 ch stride 2 + ReLU (40x40); basic residual blocks (3x3 conv ReLU, 3x3 conv, identity or "
        "1x1-projection shortcut, add, ReLU): stage1 2 x 32 ch (40x40), stage2 2 x 64 (20x20), stage3 2 x 128 "
        "(10x10). Exits: exit1 after stage1 (3x3 conv 48 ch stride 2 + ReLU, 3x3 conv 64 ch stride 2 + ReLU, "
        "global average pool, linear 10), exit2 after stage2 (1x1 conv 64 ch + ReLU, global average pool, linear "
        "10), final after stage3 (global average pool, linear 10). BN folded at export."),
    # (exit name, module it follows, output tensor); the boundaries are the modules' outputs
    exits=(("exit1", "stage1", "exit1_logits"), ("exit2", "stage2", "exit2_logits"), ("final", "stage3", "logits")),
    # joint training: the weighted sum of the exits' cross-entropies, the final exit weighted most (its
    # features must not be bent towards the early heads' needs more than a little)
    loss_weights=(0.3, 0.5, 1.0),
    size=160, train_seeds=(1000, 1001), train_hard=(0.5, 1.0), test_seed=2301,
    # the calibration split: a stratified fifth of the TRAIN digits, never trained on, drawn twice at the
    # test set's difficulty with their own seeds (the test split stays untouched for the card's accuracies)
    calib_fraction=0.2, calib_seeds=(3301, 3302), calib_file="camera_exits_calib.npz",
    epochs=10, lr=2e-3, wd=5e-4, batch=32,
)


def build_exits(args, out_dir: Path) -> dict:
    """The multi-exit model (issue 24): trained jointly on camera frames, exported whole (every exit's
    logits) and cut into stages at the exits (tools/split_models.py ``cut_exit_stages``); the card's
    ``exits`` carry each exit's test accuracy, its confidence calibration on the held-out calibration
    split (agent.models.exits) and each stage's time per batch size (split_models' profile)."""
    import onnx
    from sklearn.model_selection import train_test_split

    from agent.models.card import load_card
    from agent.models.digits import camera_frames
    from agent.models.exits import calibrate, softmax_confidence
    from agent.models.tensors import TensorSpec
    from tools.split_models import cpu_model, cut_exit_stages, profile

    spec = EXITS
    name, size = spec["name"], spec["size"]
    exit_names = [e[0] for e in spec["exits"]]
    outputs = [e[2] for e in spec["exits"]]
    img_tr_all, ytr_all_digits, img_te, yte = load_split()
    fit_idx, cal_idx = train_test_split(np.arange(len(ytr_all_digits)), test_size=spec["calib_fraction"],
                                        stratify=ytr_all_digits, random_state=SEED)
    fit_idx.sort()
    cal_idx.sort()
    img_tr, ytr = img_tr_all[fit_idx], ytr_all_digits[fit_idx]
    img_cal, ycal_digits = img_tr_all[cal_idx], ytr_all_digits[cal_idx]
    np.savez_compressed(out_dir / spec["calib_file"], images=img_cal, labels=ycal_digits)
    t0 = time.time()
    xtr = np.concatenate([camera_frames(img_tr, seed, size, hard=hard)
                          for seed, hard in zip(spec["train_seeds"], spec["train_hard"])])
    ytr_all = np.concatenate([ytr] * len(spec["train_seeds"]))
    xcal = np.concatenate([camera_frames(img_cal, seed, size) for seed in spec["calib_seeds"]])
    ycal = np.concatenate([ycal_digits] * len(spec["calib_seeds"]))
    xte = camera_frames(img_te, spec["test_seed"], size)
    f = xtr[::7].reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = f.mean(0), f.std(0)
    log(f"\n=== {name}: frames {xtr.shape} train, {xcal.shape} calibration, {xte.shape} test in "
        f"{time.time() - t0:.0f}s; mean {np.round(mean, 4)} std {np.round(std, 4)}")
    cache = REPO / "tools" / "cache" / f"{name}.pt"
    torch.manual_seed(SEED)
    model = CameraExitNet(mean, std)
    epochs = args.epochs or spec["epochs"]
    train_s = None
    if args.cached_weights and cache.is_file():
        model.load_state_dict(torch.load(cache))
        log(f"  weights from {cache} (--cached-weights: not trained again)")
    else:
        weights = spec["loss_weights"]
        ce = nn.CrossEntropyLoss()

        def joint_loss(out, yb):
            return sum(w * ce(o, yb) for w, o in zip(weights, out))

        t0 = time.time()
        train_on_frames(name, model, xtr, ytr_all, epochs, spec, joint_loss)
        train_s = time.time() - t0
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    model.eval()
    fused = fuse_bn(model)
    with torch.no_grad():
        torch_out = [np.concatenate(parts) for parts in zip(*[
            [o.numpy() for o in fused(torch.from_numpy(xte[i:i + 128]))] for i in range(0, len(xte), 128)])]
    onnx_path = out_dir / f"{name}.onnx"
    export_onnx(fused, onnx_path, size=size, output_names=tuple(outputs))
    bounds = name_split_points(onnx_path, [e[1] for e in spec["exits"][:-1]])
    boundaries = [(b["onnx_tensor"], b["shape"]) for b in bounds.values()]
    full_sess = ort_session(onnx_path, threads=2)

    def run_full(x):
        parts = [full_sess.run(outputs, {"frames": x[i:i + 128]}) for i in range(0, len(x), 128)]
        return [np.concatenate(p) for p in zip(*parts)]

    test_out, cal_out = run_full(xte), run_full(xcal)
    onnx_diff = max(float(np.abs(a - b).max()) for a, b in zip(test_out, torch_out))
    if onnx_diff > 1e-3:
        raise RuntimeError(f"{name}: onnxruntime and torch disagree by {onnx_diff}")
    stages = cut_exit_stages(onnx.load(str(onnx_path)), outputs, boundaries, name)
    stage_paths = []
    for k, proto in enumerate(stages, 1):
        stage_path = out_dir / f"{name}.stage{k}.onnx"
        stage_path.write_bytes(proto.SerializeToString())
        stage_paths.append(stage_path)
    # stages in sequence equal the whole model at every exit, on the whole test set
    feed, chain_diff = xte, 0.0
    for k, stage_path in enumerate(stage_paths):
        sess = ort_session(stage_path, threads=2)
        in_name = sess.get_inputs()[0].name
        parts = [sess.run(None, {in_name: feed[i:i + 128]}) for i in range(0, len(feed), 128)]
        got = [np.concatenate(p) for p in zip(*parts)]
        chain_diff = max(chain_diff, float(np.abs(got[0] - test_out[k]).max()))
        if (got[0].argmax(1) != test_out[k].argmax(1)).any():
            raise RuntimeError(f"{name}: stage {k + 1}'s exit top-1 differs from the whole model's")
        if len(got) > 1:
            feed = got[1]
    if chain_diff > 1e-4:
        raise RuntimeError(f"{name}: the stages in sequence differ from the whole model by {chain_diff}")
    accuracy = [float((o.argmax(1) == yte).mean()) for o in test_out]
    log(f"  exits {exit_names}: test top-1 {[round(a, 4) for a in accuracy]}; max |onnx - torch| {onnx_diff:.2e}, "
        f"max |stages - whole| {chain_diff:.2e}")
    calibration = []
    for k in range(len(outputs)):
        cal = calibrate(softmax_confidence(cal_out[k]), cal_out[k].argmax(1) == ycal)
        conf_te, ok_te = softmax_confidence(test_out[k]), test_out[k].argmax(1) == yte
        cal["test_accuracy_at_threshold"] = [None if t is None or not (conf_te >= t).any()
                                             else round(float(ok_te[conf_te >= t].mean()), 6) for t in cal["threshold"]]
        cal["test_coverage_at_threshold"] = [None if t is None else round(float((conf_te >= t).mean()), 6)
                                             for t in cal["threshold"]]
        calibration.append(cal)
        log(f"  {exit_names[k]}: thresholds {dict(zip(cal['targets'], cal['threshold']))}; calibration coverage "
            f"{cal['coverage_at_threshold']}; test accuracy there {cal['test_accuracy_at_threshold']}")
    stage_specs, feature_specs = [], []
    frames_spec = TensorSpec("frames", np.dtype(np.uint8), (None, size, size, 3))
    for tensor, shape in boundaries:
        feature_specs.append(TensorSpec(tensor, np.dtype(np.float32), (None, *[int(d) for d in shape[1:]])))
    stage_specs = [(frames_spec,)] + [(s,) for s in feature_specs]
    times = {"host": cpu_model(), "batch_sizes": list(BATCH_SIZES_EXITS)}
    if not args.no_bench:
        paths = {f"stage{k}": p for k, p in enumerate(stage_paths, 1)}
        paths["full"] = onnx_path
        specs = {f"stage{k}": stage_specs[k - 1] for k in range(1, len(stage_paths) + 1)}
        specs["full"] = (frames_spec,)
        measured = profile(paths, specs, BATCH_SIZES_EXITS, rounds=args.rounds, warmup=3)
        times.update(measured)
        for key, series in measured.items():
            log(f"  {key:6s} ms per batch {dict(zip(BATCH_SIZES_EXITS, series))}")

    def tensor_entry(t: TensorSpec) -> dict:
        return {"name": t.name, "dtype": t.dtype.name, "shape": [-1, *t.item_shape()]}

    exits = []
    for k, (exit_name, after, output) in enumerate(spec["exits"]):
        stage_path = stage_paths[k]
        entry = {
            "name": exit_name, "output": output, "after": after, "accuracy": accuracy[k],   # exact: k/N
            "stage": {"path": stage_path.name, "sha256": sha256(stage_path), "bytes": stage_path.stat().st_size},
            "stage_input": tensor_entry(stage_specs[k][0]),
            "stage_output": tensor_entry(feature_specs[k]) if k < len(feature_specs) else None,
            "calibration": calibration[k],
        }
        if "full" in times:
            entry["stage_ms"] = times[f"stage{k + 1}"]
        exits.append(entry)
    card = {
        "card_version": 1,
        "name": name,
        "task": "image-classification",
        "labels": list(LABELS),
        "inputs": [{"name": "frames", "dtype": "uint8", "shape": [-1, size, size, 3], "layout": "NHWC"}],
        "outputs": [{"name": o, "dtype": "float32", "shape": [-1, 10]} for o in outputs],
        "files": {"onnx": {"path": onnx_path.name, "sha256": sha256(onnx_path),
                           "bytes": onnx_path.stat().st_size, "accuracy": round(accuracy[-1], 6),
                           "max_abs_diff_vs_torch": onnx_diff}},
        "dataset": {
            "name": "scikit-learn digits (UCI optdigits test subset) as 160x160 camera frames",
            "split": "stratified 80/20, seed 0 (the demo models' split); the 80% again split 80/20 (stratified, "
                     "seed 0) into training and calibration digits",
            "test_size": int(len(yte)),
            "preprocess": "agent.models.digits.camera_frames",
            "test_file": "digits_test.npz",
            "seed": spec["test_seed"],
            "frame_size": size,
            "train": (f"{len(spec['train_seeds'])} camera_frames draws per training digit (seeds "
                      f"{list(spec['train_seeds'])}, hard {list(spec['train_hard'])}), {len(xtr)} frames"),
            "calibration": {"file": spec["calib_file"], "seeds": list(spec["calib_seeds"]), "hard": 1.0,
                            "size": int(len(ycal)),
                            "note": "one camera_frames draw per seed of the calibration digits (never trained "
                                    "on; not the test split), concatenated in seed order"},
        },
        "normalization": {"in_graph": "x/255, then (x - mean)/std per RGB channel, NHWC->NCHW",
                          "mean": [round(float(v), 6) for v in mean],
                          "std": [round(float(v), 6) for v in std]},
        "architecture": spec["architecture"],
        "params": int(sum(p.numel() for p in fused.parameters())),
        "flops_per_image": count_flops(FinalOnly(fused), size),
        "flops_method": "torch.utils.flop_counter.FlopCounterMode on the BN-folded model at batch 1, every exit "
                        "computed: convolutions and linear layers, 2 FLOPs per multiply-add",
        "exits": exits,
        "exit_method": (
            "tools/build_models.py --models camera_exits: trained jointly (loss = "
            f"{' + '.join(f'{w} CE({e})' for w, e in zip(spec['loss_weights'], exit_names))}), the whole model "
            "exported to ONNX with every exit's logits, then cut at the exits into stages (tools/split_models.py "
            "cut_exit_stages: stage 1 frames -> (exit1 logits, stage1_out), stage k the previous stage's features "
            "-> (exit k logits, its features), the last stage -> the final logits; dynamic batch); the stages in "
            f"sequence equal the whole model at every exit on the whole test set (max |diff| {chain_diff:.2g}, same "
            "top-1). accuracy: top-1 on the test set. calibration: agent.models.exits.calibrate on the calibration "
            "split (dataset.calibration), with the test set's accuracy and coverage at each threshold beside it. "
            "stage_ms: onnxruntime CPU, 1 intra-op thread, spinning off, zero inputs, median of "
            f"{args.rounds} runs per batch size (stages and the whole model taking turns), ms per batch"),
        "exit_profile": times,
        "provenance": {
            "tool": "tools/build_models.py --models camera_exits",
            "torch": torch.__version__.split("+")[0],
            "seed": SEED,
            "epochs": epochs,
            "train_seconds_2_threads": None if train_s is None else round(train_s),
            "built": _dt.date.today().isoformat(),
            "onnx_opset": OPSET,
            "test_accuracy_torch": [round(float((o.argmax(1) == yte).mean()), 4) for o in torch_out],
            "note": "ONNX only; the early-exit model of issue 24, not in the demo config",
        },
    }
    card_path = out_dir / f"{name}.json"
    from tools.split_models import dump_card
    card_path.write_text(dump_exits_card(card, dump_card))
    loaded = load_card(card_path)
    for point in loaded.exits:
        point.verify_stage()
    log(f"  wrote {card_path.name}; files {onnx_path.stat().st_size + sum(p.stat().st_size for p in stage_paths)} "
        f"bytes (whole model {onnx_path.stat().st_size}, stages {[p.stat().st_size for p in stage_paths]})")
    return card


BATCH_SIZES_EXITS = (1, 2, 4, 8)


class FinalOnly(nn.Module):
    """count_flops wants one output: every exit is computed, the sum is a free add."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frames):
        return sum(self.model(frames))


def dump_exits_card(card: dict, dump_card) -> str:
    """The card as split_models writes cards, with each exit's calibration and time series on one line."""
    import re

    text = dump_card(card)
    # collapse the short numeric lists (calibration series, shapes, stage_ms) onto one line each
    return re.sub(r"\[\s*\n\s*((?:[-0-9.eE]+|null|true|false)(?:,\s*\n\s*(?:[-0-9.eE]+|null|true|false))*)\s*\n\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out-dir", type=Path, default=DEMO_DIR)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, CAMERA["name"], EXITS["name"]],
                    help=f"models to build (default: the demo models; {CAMERA['name']} and {EXITS['name']} "
                         "only when named)")
    ap.add_argument("--epochs", type=int, default=0, help="override epochs (0: per-model default)")
    ap.add_argument("--calib", type=int, default=512, help="train frames for int8 calibration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    ap.add_argument("--cached-weights", action="store_true",
                    help=f"{EXITS['name']}: reuse the trained weights in tools/cache/ (export, cut, card again)")
    ap.add_argument("--rounds", type=int, default=40, help=f"{EXITS['name']}: timed runs per stage and batch size")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    if EXITS["name"] in args.models:
        build_exits(args, args.out_dir)
        args.models = [m for m in args.models if m != EXITS["name"]]
        if not args.models:
            return 0
    if CAMERA["name"] in args.models:
        build_camera(args, args.out_dir)
        args.models = [m for m in args.models if m != CAMERA["name"]]
        if not args.models:
            return 0
    img_tr, ytr, img_te, yte = load_split()
    np.savez_compressed(args.out_dir / "digits_test.npz", images=img_te, labels=yte)
    xtr, xte = frames_from_digits(img_tr), frames_from_digits(img_te)
    f = xtr.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = f.mean(0), f.std(0)
    log(f"data: train {len(ytr)}, test {len(yte)} (stratified, seed {SEED}); "
        f"frames {xtr.shape[1:]} uint8; channel mean {np.round(mean, 4)}, std {np.round(std, 4)}")

    for name in args.models:
        build_one(name, MODELS[name], (xtr, ytr, xte, yte), args, mean, std, args.out_dir)

    total = sum(p.stat().st_size for p in args.out_dir.iterdir() if p.is_file())
    log(f"\ndone in {time.time() - t0:.0f}s; {args.out_dir} holds {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
