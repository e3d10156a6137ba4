"""The intermediate-tensor codecs (agent.offload.codecs): each codec's round-trip bound as its
docstring states it, NaN/inf handling, and the wire form's strict validation against hostile input."""
from __future__ import annotations

import math
import zlib

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.offload import codecs
from agent.offload.codecs import CODECS, CodecError, EncodedTensor, decode, encode

BASES = ("raw", "fp16", "int8", "int4", "sparse8")
QUANTISED = [n for n in CODECS if CODECS[n].base in ("int8", "int4", "sparse8")]
LEVELS = {"int8": 255, "sparse8": 255, "int4": 15}
TINY = float(np.finfo(np.float32).tiny)

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
wide = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def channel_scale(x: np.ndarray, levels: int = 255) -> np.ndarray:
    """The documented per-channel step, computed here independently of the codec's code."""
    n, c = (x.shape[0], x.shape[1]) if x.ndim >= 2 else (1, 1)
    x3 = x.reshape(n, c, math.prod(x.shape[2:]) if x.ndim >= 2 else x.size)
    if x3.size == 0:
        return np.zeros(x3.shape[1])
    lo = np.minimum(x3.min(axis=(0, 2)).astype(np.float64), 0)
    hi = np.maximum(x3.max(axis=(0, 2)).astype(np.float64), 0)
    span = hi - lo
    return np.maximum((span / levels).astype(np.float32).astype(np.float64), TINY)


def per_element(x: np.ndarray, per_channel: np.ndarray) -> np.ndarray:
    if x.ndim >= 2:
        return np.broadcast_to(per_channel.reshape((1, -1) + (1,) * (x.ndim - 2)), x.shape)
    return np.broadcast_to(per_channel.reshape(()) if per_channel.size == 1 else per_channel, x.shape)


def through_wire(encoded: EncodedTensor) -> EncodedTensor:
    return EncodedTensor.from_wire(msgpack.unpackb(msgpack.packb(encoded.to_wire())))


def test_registry_names_every_base_with_every_installed_stage():
    for base in BASES:
        assert base in CODECS
        for stage in ("zstd", "lz4", "zlib"):
            assert f"{base}+{stage}" in CODECS       # zstandard and lz4 are agent dependencies
    assert not CODECS["raw"].lossy and not CODECS["raw+zstd"].lossy
    assert all(CODECS[n].lossy for n in CODECS if CODECS[n].base != "raw")
    assert codecs.available_codecs() == list(CODECS)


@wide
@given(hnp.arrays(np.float32, shapes, elements=finite32))
def test_raw_is_bit_exact_and_stages_change_nothing(x):
    for name in ("raw", "raw+zstd", "raw+lz4", "raw+zlib"):
        out = decode(through_wire(encode(x, name)))
        assert out.dtype == np.float32 and out.shape == x.shape
        assert np.array_equal(out.view(np.uint32), x.view(np.uint32))


@wide
@given(hnp.arrays(np.float32, shapes, elements=st.floats(-65519, 65519, width=32)))
def test_fp16_bound(x):
    for name in ("fp16", "fp16+zstd"):
        out = decode(through_wire(encode(x, name)))
        bound = np.maximum(np.abs(x.astype(np.float64)) * 2.0 ** -11, 2.0 ** -25)
        assert np.all(np.abs(out.astype(np.float64) - x) <= bound)


def test_fp16_overflow_nan_and_inf():
    x = np.array([70000.0, -1e30, np.nan, np.inf, -np.inf, 65519.0, -0.0], np.float32)
    out = decode(encode(x, "fp16"))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    assert out[3] == np.inf and out[4] == -np.inf and out[5] == 65504.0
    assert out[6] == 0 and np.signbit(out[6])


@wide
@given(hnp.arrays(np.float32, shapes, elements=finite32), st.booleans())
def test_int8_and_sparse8_bound(x, relu):
    if relu:
        x = np.maximum(x, 0)
    reference = {base: decode(encode(x, base)) for base in ("int8", "int4")}
    reference["sparse8"] = reference["int8"]     # sparse8 decodes bit for bit as int8 does
    for name in QUANTISED:
        base = CODECS[name].base
        step = per_element(x, channel_scale(x, LEVELS[base]))
        out = decode(through_wire(encode(x, name)))
        assert out.shape == x.shape and out.dtype == np.float32
        assert np.all(np.abs(out.astype(np.float64) - x) <= 1.001 * step), name
        # every lossless stage decodes bit for bit as its base does
        assert np.array_equal(out.view(np.uint32), reference[base].view(np.uint32)), name
        assert np.all(out[x == 0] == 0)          # zeros decode to exactly 0.0
        if relu:                                 # a channel starting at 0: half a step
            assert np.all(np.abs(out.astype(np.float64) - x) <= 0.5001 * step), name


def test_quantised_codecs_on_extremes_and_zero():
    big = np.float32(3.4e38)
    cases = [
        np.zeros((2, 3, 4, 4), np.float32),
        np.full((1, 2, 3), -big, np.float32),
        np.array([[[big, -big, 1.0]]], np.float32),
        np.array([[[1e-45, 0.0, 3e-45]]], np.float32),   # subnormals: the step is raised to tiny
        np.array([[[-5.0, -1.0, -3.0]]], np.float32),     # negative only: the range still holds 0
    ]
    for x in cases:
        for name in QUANTISED:
            step = per_element(x, channel_scale(x, LEVELS[CODECS[name].base]))
            out = decode(encode(x, name))
            assert np.all(np.isfinite(out))
            assert np.all(np.abs(out.astype(np.float64) - x) <= 1.001 * step), (name, x)


@pytest.mark.parametrize("name", QUANTISED)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantised_codecs_refuse_nan_and_inf_naming_the_channel(name, bad):
    x = np.ones((1, 3, 2, 2), np.float32)
    x[0, 2, 1, 0] = bad
    with pytest.raises(CodecError, match="channel 2") as err:
        encode(x, name)
    assert err.value.field == "data"


def test_sparse8_is_smaller_than_int8_on_relu_activations_and_lossless_stages_shrink():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(4, 16, 8, 8)).astype(np.float32), 0)   # about half zeros
    size = {name: encode(x, name).nbytes for name in CODECS}
    assert size["int8"] == 5 * 16 + x.size and size["int4"] == 5 * 16 + x.size // 2
    assert size["sparse8"] < 0.7 * size["int8"]
    assert size["fp16"] == 2 * x.size and size["raw"] == 4 * x.size
    assert encode(x, "int8").ratio() == pytest.approx(4 * x.size / size["int8"])
    assert size["int8+zstd"] < size["int8"] and size["raw+zlib"] < size["raw"]


def test_encode_takes_other_float_dtypes_and_strided_views_and_refuses_ints():
    x = np.arange(48, dtype=np.float64).reshape(2, 3, 8)[:, :, ::2]
    assert np.array_equal(decode(encode(x, "raw")), x.astype(np.float32))
    with pytest.raises(CodecError, match="float") as err:
        encode(np.arange(4), "raw")
    assert err.value.field == "dtype"
    with pytest.raises(CodecError, match="unknown") as err:
        encode(np.zeros(3, np.float32), "int3")
    assert err.value.field == "codec"


def test_wire_form():
    x = np.ones((1, 2, 3, 3), np.float32)
    wire = encode(x, "raw").to_wire()
    assert set(wire) == {"dtype", "shape", "data"}          # raw: exactly DESIGN's plain tensor
    wire = encode(x, "int8+zstd").to_wire()
    assert wire["codec"] == "int8+zstd" and wire["dtype"] == "float32" and wire["shape"] == [1, 2, 3, 3]
    plain = {"dtype": "float32", "shape": [2], "data": np.float32([1, 2]).tobytes()}
    assert np.array_equal(decode(EncodedTensor.from_wire(plain)), [1, 2])
    assert np.array_equal(decode(EncodedTensor.from_wire(dict(plain, codec=None))), [1, 2])


def wire(codec: str = "raw", shape=(1, 2, 2, 2), data: bytes | None = None, **extra) -> dict:
    if data is None:
        data = encode(np.ones(shape, np.float32), codec).data
    return {"dtype": "float32", "shape": list(shape), "data": data, "codec": codec, **extra}


@pytest.mark.parametrize("bad, field, words", [
    ([1, 2], "tensor", "map"),
    (wire(extra=1), "extra", "unknown field"),
    ({"dtype": "float32", "shape": [1]}, "data", "missing"),
    (dict(wire(), dtype="float64"), "dtype", "float32"),
    (dict(wire(), codec="int3"), "codec", "unknown"),
    (dict(wire(), codec=7), "codec", "string"),
    (dict(wire(), shape="1,2"), "shape", "list"),
    (dict(wire(), shape=[1, -2]), "shape", "dimension 1 is -2"),
    (dict(wire(), shape=[1, True]), "shape", "dimension 1"),
    (dict(wire(), shape=[1, 2.0]), "shape", "dimension 1"),
    (dict(wire(), shape=[1] * 9), "shape", "rank 9"),
    (dict(wire(), shape=[2 ** 40]), "shape", "over the limit"),
    (dict(wire(), shape=[2 ** 20, 2 ** 20, 2 ** 20]), "shape", "over the limit"),
    (dict(wire(), data="abc"), "data", "bytes"),
])
def test_from_wire_refuses_malformed_fields(bad, field, words):
    with pytest.raises(CodecError, match=words) as err:
        EncodedTensor.from_wire(bad)
    assert err.value.field == field


@pytest.mark.parametrize("name", list(CODECS))
def test_hostile_shapes_never_allocate(name):
    for shape in ([2 ** 40], [2 ** 31, 2 ** 31], [-1, 4]):
        with pytest.raises(CodecError) as err:
            decode(EncodedTensor.from_wire(wire(name, shape=[1], data=b"\0" * 16) | {"shape": shape}))
        assert err.value.field == "shape"
        with pytest.raises(CodecError) as err:      # a hand-built EncodedTensor is checked too
            decode(EncodedTensor(name, tuple(shape), b"\0" * 16))
        assert err.value.field == "shape"


@pytest.mark.parametrize("name", [n for n in CODECS if CODECS[n].stage is None])
def test_truncated_or_padded_payloads(name):
    good = wire(name)
    for data in (good["data"][:-1], bytes(good["data"]) + b"\0", b""):
        # from_wire catches what the length alone shows (all but sparse8's variable part)...
        with pytest.raises(CodecError, match="bytes|bitmap") as err:
            decode(EncodedTensor.from_wire(dict(good, data=data)))
        assert err.value.field == "data"
        # ...and decode checks a hand-built EncodedTensor the same way
        with pytest.raises(CodecError, match="bytes|bitmap"):
            decode(EncodedTensor(name, (1, 2, 2, 2), data))


@pytest.mark.parametrize("name", [n for n in CODECS if CODECS[n].stage is not None])
def test_corrupt_and_truncated_streams(name):
    good = wire(name)
    for data in (b"\x00garbage" * 3, good["data"][: len(good["data"]) // 2], b""):
        with pytest.raises(CodecError) as err:
            decode(EncodedTensor.from_wire(dict(good, data=data)))
        assert err.value.field == "data"


def test_decompression_bombs_stop_at_the_shapes_size():
    import lz4.block
    import zstandard
    huge = b"\0" * (64 << 20)
    small_shape = [1, 2, 2, 2]      # at most 5*2 + 8 bytes of int8 payload
    bombs = {
        "int8+zstd": zstandard.ZstdCompressor().compress(huge),                          # declares 64 MiB
        "int8+lz4": lz4.block.compress(huge, store_size=False),
        "int8+zlib": zlib.compress(huge),
    }
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(huge)
    bombs_unsized = {"int8+zstd": unsized}
    for name, data in list(bombs.items()) + list(bombs_unsized.items()):
        with pytest.raises(CodecError) as err:
            decode(EncodedTensor.from_wire(wire(name, shape=small_shape, data=data)))
        assert err.value.field == "data"


def test_bad_inner_payloads():
    x = np.maximum(np.arange(-8, 8, dtype=np.float32).reshape(1, 2, 2, 4), 0)
    for name in ("int8", "sparse8"):
        data = bytearray(encode(x, name).data)
        data[0:4] = np.float32(np.nan).tobytes()            # channel 0's scale
        with pytest.raises(CodecError, match="scale"):
            decode(EncodedTensor(name, x.shape, bytes(data)))
        data[0:4] = np.float32(-1).tobytes()
        with pytest.raises(CodecError, match="scale"):
            decode(EncodedTensor(name, x.shape, bytes(data)))
    data = bytearray(encode(x, "sparse8").data)
    bitmap_at = 5 * 2
    data[bitmap_at] ^= 0xFF                                 # the bitmap no longer matches the codes
    with pytest.raises(CodecError, match="bitmap marks"):
        decode(EncodedTensor("sparse8", x.shape, bytes(data)))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(CODECS)), st.lists(st.integers(0, 5), max_size=4), st.binary(max_size=200))
def test_random_payloads_decode_or_raise_codec_error(name, shape, data):
    try:
        out = decode(EncodedTensor.from_wire({"dtype": "float32", "shape": shape, "data": data, "codec": name}))
    except CodecError:
        return
    assert out.shape == tuple(shape) and out.dtype == np.float32


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(list(CODECS)), hnp.arrays(np.float32, st.just((1, 3, 2, 2)), elements=finite32),
       st.integers(0, 10 ** 6), st.integers(0, 255))
def test_flipped_bytes_decode_or_raise_codec_error(name, x, where, value):
    data = bytearray(encode(x, name).data)
    if data:
        data[where % len(data)] = value
    try:
        out = decode(EncodedTensor(name, x.shape, bytes(data)))
    except CodecError:
        return
    assert out.shape == x.shape


def test_max_bytes_is_the_callers_to_lower():
    enc = encode(np.zeros((4, 4), np.float32), "int8+zstd")
    with pytest.raises(CodecError, match="over the limit"):
        decode(enc, max_bytes=32)
    assert decode(enc, max_bytes=64).shape == (4, 4)
    assert math.isinf(EncodedTensor("raw", (0,), b"").ratio())


# --- on a real model: the bench's head/tail cut and the accuracy the tail keeps -------------------

def test_resnet_digits_tail_on_decoded_activations_keeps_its_answers(tmp_path):
    pytest.importorskip("onnx")
    from agent.models.card import load_card
    from edge_lab.bench.codecs import _session, _test_set, head_and_tail, split_points_of
    card = load_card("demo:resnet_digits")
    name, tensor, point = [p for p in split_points_of(card) if p[0] == "stage2"][0]
    head_path, tail_path = head_and_tail(card, point, tensor, tmp_path)
    head, tail, full = (_session(p, 1) for p in (head_path, tail_path, card.file("onnx").path))
    frames, labels = _test_set(card)
    frames, labels = frames[:48], labels[:48]
    acts = head.run(None, {"frames": frames})[0]
    assert acts.shape == (48, 64, 16, 16) and (acts >= 0).all()       # post-ReLU, as designed for
    exact = tail.run(None, {tensor: acts})[0]
    np.testing.assert_allclose(exact, full.run(None, {"frames": frames})[0], atol=1e-4)   # the cut is right
    for codec in ("int8", "sparse8+lz4", "fp16"):
        enc = encode(acts, codec)
        assert enc.ratio() > 1.9 if codec == "fp16" else enc.ratio() > 3.9
        logits = tail.run(None, {tensor: decode(through_wire(enc))})[0]
        assert (logits.argmax(1) == exact.argmax(1)).mean() >= 47 / 48, codec
        assert np.abs(logits - exact).max() < 0.25, codec


def test_bench_codecs_command_prints_the_table(capsys):
    pytest.importorskip("onnx")
    import re

    from agent.cli import main
    from agent.models.card import load_card
    from edge_lab.bench.codecs import split_points_of
    split = split_points_of(load_card("demo:resnet_digits"))[-1][0]     # the cheapest tail
    rc = main(["bench", "codecs", "--models", "resnet_digits", "--splits", split, "--codecs", "int8,int8+lz4",
               "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    header = re.search(rf"resnet_digits @ {split} \(\w+, per item \[(\d+), (\d+), (\d+)\] float32", out)
    assert header, out
    channels, item = int(header[1]), int(header[1]) * int(header[2]) * int(header[3])
    rows = {line.split()[-9]: line.split() for line in out.splitlines() if "int8" in line and "%" in line}
    assert set(rows) == {"int8", "int8+lz4"}
    # 360 test items in batches of 8, each batch with its scales and zero points
    assert float(rows["int8"][-8]) == pytest.approx(4 * 8 * item / (8 * item + 5 * channels), abs=0.01)
    assert rows["int8"][-1] == rows["int8+lz4"][-1]     # a lossless stage changes no answer
    assert main(["bench", "codecs", "--models", "resnet_digits", "--splits", "nowhere"]) == 2
    assert main(["bench", "codecs", "--codecs", "int3", "--splits", split]) == 2
