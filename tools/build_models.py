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

def export_onnx(model: nn.Module, path: Path, size: int = 64) -> None:
    """torch.export-based ONNX export, one file, dynamic batch axis."""
    import logging

    import onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    sample = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("N", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (sample,), None, input_names=["frames"], output_names=["logits"],
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
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["wd"])
    batch = spec["batch"]
    steps = epochs * math.ceil(len(xtr) / batch)
    # constant rate, then a linear decay over the last third (a warm-up to a higher peak kept this
    # net at chance for the whole of a budget this short)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, 3.0 * (1.0 - k / steps)))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    ytr_t = torch.from_numpy(ytr_all)
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
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            tot += len(idx)
            if (i // batch) % 20 == 19:
                log(f"    step {i // batch + 1}: loss {loss_sum / tot:.4f} train acc {correct / tot:.4f} "
                    f"{time.time() - t0:6.1f}s")
        log(f"  [{name}] epoch {ep}/{epochs}  loss {loss_sum / tot:.4f}  train acc {correct / tot:.4f}  "
            f"{time.time() - t0:6.1f}s")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out-dir", type=Path, default=DEMO_DIR)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, CAMERA["name"]],
                    help=f"models to build (default: the demo models; {CAMERA['name']} only when named)")
    ap.add_argument("--epochs", type=int, default=0, help="override epochs (0: per-model default)")
    ap.add_argument("--calib", type=int, default=512, help="train frames for int8 calibration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

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
