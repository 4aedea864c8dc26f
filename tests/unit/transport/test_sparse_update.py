import copy
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.utils.decomposers import flare_decomposers
from nvflare.app_common.decomposers import common_decomposers
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.fobs import fobs as fobs_registry

from medflare.transport.sparse_update import (
    BITMASK,
    INDICES,
    SparsePayloadError,
    SparseTensor,
    SparseTensorDecomposer,
    decode_sparse,
    encode_sparse,
    index_dtype_for,
    kept_masks,
    register_sparse_decomposers,
    serialized_size,
)

SPARSE_TYPE_NAME = "medflare.transport.sparse_update.SparseTensor"


@pytest.fixture(autouse=True, scope="module")
def fobs_as_in_a_job():
    """What NVFlare registers in a job process, plus ours."""
    flare_decomposers.register()
    common_decomposers.register()
    register_sparse_decomposers()


names = st.sampled_from(["conv.weight", "conv.bias", "norm.weight", "norm.num_batches_tracked", "head.weight"])
shapes = array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)


@st.composite
def updates_and_masks(draw, max_tensors=4):
    """Random tensors of float32, float64 or int64 (NaN, inf and -0.0 included), each with a mask
    that is empty, full or random."""
    update, masks = {}, {}
    for name in draw(st.lists(names, min_size=1, max_size=max_tensors, unique=True)):
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int64]))
        shape = draw(shapes)
        update[name] = draw(arrays(dtype, shape))
        kind = draw(st.sampled_from(["empty", "full", "random"]))
        masks[name] = {
            "empty": np.zeros(shape, bool),
            "full": np.ones(shape, bool),
            "random": draw(arrays(np.bool_, shape)),
        }[kind]
    return update, masks


def _expected(array, mask):
    out = np.zeros_like(array)
    out[mask] = array[mask]
    return out


def _shareable(data):
    return DXO(DataKind.WEIGHT_DIFF, data=data).to_shareable()


def _positions_cost(tensor):
    return tensor.nbytes - tensor.values.nbytes


@settings(max_examples=120, deadline=None)
@given(updates_and_masks())
def test_decode_restores_every_kept_value_bit_for_bit_and_zeros_elsewhere(case):
    update, masks = case
    encoded = encode_sparse(update, masks)
    decoded = decode_sparse(encoded)
    assert list(decoded) == list(update)
    for name, array in update.items():
        assert decoded[name].shape == array.shape and decoded[name].dtype == array.dtype
        assert decoded[name].tobytes() == _expected(array, masks[name]).tobytes()
        assert decoded[name].flags.writeable


@settings(max_examples=120, deadline=None)
@given(updates_and_masks())
def test_kept_masks_are_the_masks_and_the_cheaper_encoding_is_chosen(case):
    update, masks = case
    encoded = encode_sparse(update, masks)
    restored = kept_masks(encoded)
    for name, array in update.items():
        np.testing.assert_array_equal(restored[name], masks[name])
        assert restored[name].shape == array.shape and restored[name].dtype == np.bool_
        tensor = encoded[name]
        n, k = array.size, int(masks[name].sum())
        index_cost = k * index_dtype_for(n).itemsize
        assert tensor.num_kept == k and tensor.size == n
        assert _positions_cost(tensor) == min(index_cost, math.ceil(n / 8))
        assert tensor.encoding == (BITMASK if math.ceil(n / 8) < index_cost else INDICES)


@settings(max_examples=60, deadline=None)
@given(updates_and_masks())
def test_inputs_are_never_modified_nor_shared(case):
    update, masks = case
    before = (copy.deepcopy(update), copy.deepcopy(masks))
    encoded = encode_sparse(update, masks)
    decoded = decode_sparse(encoded)
    for name in update:
        assert update[name].tobytes() == before[0][name].tobytes()
        np.testing.assert_array_equal(masks[name], before[1][name])
        for array in (encoded[name].values, encoded[name].indices, encoded[name].bitmask, decoded[name]):
            assert array is None or not np.shares_memory(array, update[name])


@settings(max_examples=60, deadline=None)
@given(updates_and_masks())
def test_without_masks_the_non_zero_entries_are_kept(case):
    update, _ = case
    decoded = decode_sparse(encode_sparse(update))
    restored = kept_masks(encode_sparse(update))
    for name, array in update.items():
        np.testing.assert_array_equal(restored[name], array != 0)
        # equal as values; a -0.0 comes back as 0.0, NaN as the same NaN
        assert decoded[name].tobytes() == _expected(array, array != 0).tobytes()


def test_index_dtype_is_the_smallest_unsigned_type_holding_the_last_position():
    assert [index_dtype_for(n) for n in (0, 1, 256, 257, 65536, 65537, 2**32, 2**32 + 1)] == [
        np.uint8,
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.uint32,
        np.uint32,
        np.uint64,
    ]


@pytest.mark.parametrize(
    "size, kept, encoding, index_dtype",
    [
        (100_000, 3_000, INDICES, np.uint32),  # 12,000 bytes of indices < 12,500 of bitmask
        (100_000, 3_200, BITMASK, None),  # 12,800 > 12,500
        (1_000, 62, INDICES, np.uint16),  # 124 < 125
        (1_000, 63, BITMASK, None),  # 126 > 125
        (200, 20, INDICES, np.uint8),  # 20 bytes < 25
        (200, 30, BITMASK, None),  # 30 > 25
        (1, 1, INDICES, np.uint8),  # a tie keeps indices
    ],
)
def test_bitmask_is_used_exactly_when_it_is_smaller(size, kept, encoding, index_dtype):
    mask = np.zeros(size, bool)
    mask[np.random.default_rng(0).choice(size, kept, replace=False)] = True
    tensor = encode_sparse({"w": np.ones(size, np.float32)}, {"w": mask})["w"]
    assert tensor.encoding == encoding
    assert (tensor.indices is None) == (encoding == BITMASK) and (tensor.bitmask is None) == (encoding == INDICES)
    if index_dtype is not None:
        assert tensor.indices.dtype == index_dtype
    np.testing.assert_array_equal(kept_masks({"w": tensor})["w"], mask)


def test_numpy_scalars_zero_size_and_non_floating_tensors_round_trip():
    update = {
        "scalar": np.float32(-2.5),
        "zero_d": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float64),
        "counter": np.zeros((), np.int64),
        "flags": np.array([True, False, True]),
    }
    decoded = decode_sparse(encode_sparse(update))
    assert decoded["scalar"].shape == () and decoded["scalar"] == np.float32(-2.5)
    assert decoded["zero_d"] == 7 and decoded["empty"].shape == (0, 3) and decoded["counter"] == 0
    np.testing.assert_array_equal(decoded["flags"], [True, False, True])


@pytest.mark.parametrize(
    "update, masks, error, message",
    [
        ([np.ones(3)], None, TypeError, "update must be a mapping"),
        ({"w": [1.0, 2.0]}, None, TypeError, "update\\['w'\\] must be a numpy array"),
        ({"w": np.array(["a"])}, None, ValueError, "update\\['w'\\] has dtype <U1"),
        ({"w": np.array([1j])}, None, ValueError, "update\\['w'\\] has dtype complex128"),
        ({"w": np.ones(3)}, {"w": np.ones(3)}, TypeError, "masks\\['w'\\] must be a numpy bool array, got float64"),
        ({"w": np.ones(3)}, {"w": np.ones(4, bool)}, ValueError, "masks\\['w'\\] has shape \\(4,\\)"),
        ({"w": np.ones(3)}, {"v": np.ones(3, bool)}, ValueError, "missing \\['w'\\], unexpected \\['v'\\]"),
        ({"w": np.ones(3)}, [np.ones(3, bool)], TypeError, "masks must be a mapping"),
    ],
)
def test_encode_refuses_bad_input(update, masks, error, message):
    with pytest.raises(error, match=message):
        encode_sparse(update, masks)


# --- malformed payloads -------------------------------------------------------------------------

#: [[1, 0, 0, 0, 2], [0, 0, 0, 0, 3]] both ways
VALUES = np.array([1.0, 2.0, 3.0], np.float32)
GOOD_INDICES = SparseTensor((2, 5), "float32", INDICES, VALUES, indices=np.array([0, 4, 9], np.uint8))
GOOD_BITMASK = SparseTensor(
    (2, 5), "float32", BITMASK, VALUES, bitmask=np.packbits([1, 0, 0, 0, 1, 0, 0, 0, 0, 1], bitorder="little")
)
BAD_BOOL = SparseTensor((2,), "bool", INDICES, np.uint8([1, 2]).view(bool), indices=np.uint8([0, 1]))


def _with(tensor, **changes):
    return dataclasses.replace(tensor, **changes)


MALFORMED = [
    ("index out of range", _with(GOOD_INDICES, indices=np.array([0, 4, 10], np.uint8)), "out of range \\[0, 10\\)"),
    ("negative index", _with(GOOD_INDICES, indices=np.array([-1, 4, 9], np.int64)), "out of range"),
    ("unsorted indices", _with(GOOD_INDICES, indices=np.array([4, 0, 9], np.uint8)), "strictly increasing"),
    ("duplicate indices", _with(GOOD_INDICES, indices=np.array([0, 4, 4], np.uint8)), "strictly increasing"),
    ("fewer indices than values", _with(GOOD_INDICES, indices=np.array([0, 4], np.uint8)), "2 indices but 3 values"),
    ("float indices", _with(GOOD_INDICES, indices=np.array([0.0, 4.0, 9.0])), "indices must be a 1-D integer array"),
    ("2-D indices", _with(GOOD_INDICES, indices=np.array([[0, 4, 9]], np.uint8)), "indices must be a 1-D integer"),
    ("no indices", _with(GOOD_INDICES, indices=None), "indices must be a 1-D integer array"),
    ("unknown dtype", _with(GOOD_INDICES, dtype="complex64"), "unknown dtype 'complex64'"),
    ("object dtype", _with(GOOD_INDICES, dtype="object"), "unknown dtype 'object'"),
    ("values of another dtype", _with(GOOD_INDICES, values=np.array([1.0, 2.0, 3.0])), "values must be a 1-D float32"),
    ("2-D values", _with(GOOD_INDICES, values=np.ones((3, 1), np.float32)), "values must be a 1-D float32 array"),
    ("values as a list", _with(GOOD_INDICES, values=[1.0, 2.0, 3.0]), "values must be a 1-D float32 array, got list"),
    ("unknown encoding", _with(GOOD_INDICES, encoding="rle"), "unknown encoding 'rle'"),
    ("indices and bitmask", _with(GOOD_INDICES, bitmask=GOOD_BITMASK.bitmask), "both indices and a bitmask"),
    ("negative dimension", _with(GOOD_INDICES, shape=(-2, 5)), "negative dimension"),
    ("shape as a list", _with(GOOD_INDICES, shape=[2, 5]), "shape must be a tuple of ints"),
    ("float dimension", _with(GOOD_INDICES, shape=(2.0, 5)), "shape must be a tuple of ints"),
    ("enormous shape", _with(GOOD_INDICES, shape=(2**40, 2**40)), "more than"),
    ("bitmask too short", _with(GOOD_BITMASK, bitmask=GOOD_BITMASK.bitmask[:1]), "1 bytes, 10 entries need 2"),
    ("bitmask too long", _with(GOOD_BITMASK, bitmask=np.zeros(3, np.uint8)), "bitmask has 3 bytes"),
    ("bitmask of bools", _with(GOOD_BITMASK, bitmask=np.ones(2, bool)), "bitmask must be a 1-D uint8 array"),
    ("padding bits set", _with(GOOD_BITMASK, bitmask=GOOD_BITMASK.bitmask | np.uint8([0, 0b100])), "padding"),
    ("bitmask count", _with(GOOD_BITMASK, bitmask=np.packbits([1] * 4 + [0] * 6, bitorder="little")), "marks 4"),
    ("bool bytes", BAD_BOOL, "bool values hold bytes other than 0 and 1"),
]


@pytest.mark.parametrize("tensor, message", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
@pytest.mark.parametrize("function", [decode_sparse, kept_masks])
def test_malformed_tensors_are_refused_naming_the_tensor(function, tensor, message):
    with pytest.raises(ValueError, match=f"sparse tensor 'layer.weight': .*{message}") as raised:
        function({"good": GOOD_BITMASK, "layer.weight": tensor})
    assert isinstance(raised.value, SparsePayloadError)


@pytest.mark.parametrize(
    "encoded, message",
    [
        ([GOOD_INDICES], "must be a mapping of name to SparseTensor, got list"),
        ({"w": np.ones(10)}, "sparse tensor 'w': must be a SparseTensor, got ndarray"),
        ({3: GOOD_INDICES}, "names must be strings, got 3"),
    ],
)
def test_payloads_that_are_not_sparse_updates_are_refused(encoded, message):
    with pytest.raises(SparsePayloadError, match=message):
        decode_sparse(encoded)


def test_the_good_reference_tensors_decode():
    decoded = decode_sparse({"a": GOOD_INDICES, "b": GOOD_BITMASK})
    expected = np.array([[1, 0, 0, 0, 2], [0, 0, 0, 0, 3]], np.float32)
    np.testing.assert_array_equal(decoded["a"], expected)
    np.testing.assert_array_equal(decoded["b"], expected)


def test_expected_shapes_refuse_a_tensor_the_model_does_not_have_before_allocating():
    huge = _with(GOOD_INDICES, shape=(2**20, 2**20))  # 4 TiB of float32 if it were built
    with pytest.raises(SparsePayloadError, match="'w': has shape \\(1048576, 1048576\\), the model has \\(2, 5\\)"):
        decode_sparse({"w": huge}, expected_shapes={"w": (2, 5)})
    with pytest.raises(SparsePayloadError, match="'extra': is not in the model"):
        kept_masks({"w": GOOD_INDICES, "extra": GOOD_INDICES}, expected_shapes={"w": (2, 5)})
    assert decode_sparse({"w": GOOD_INDICES}, expected_shapes={"w": [2, 5]})["w"].shape == (2, 5)


# --- FOBS ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(updates_and_masks())
def test_a_shareable_of_sparse_tensors_round_trips_through_fobs(case):
    update, masks = case
    encoded = encode_sparse(update, masks)
    dxo = from_shareable(fobs.loads(fobs.dumps(_shareable(encoded))))
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert all(isinstance(v, SparseTensor) for v in dxo.data.values())
    decoded = decode_sparse(dxo.data)
    for name, array in update.items():
        assert decoded[name].dtype == array.dtype
        assert decoded[name].tobytes() == _expected(array, masks[name]).tobytes()
        np.testing.assert_array_equal(kept_masks(dxo.data)[name], masks[name])


def test_large_arrays_split_off_as_fobs_datums_round_trip():
    rng = np.random.default_rng(1)
    update = {"w": rng.standard_normal((64, 64, 8), dtype=np.float32)}
    masks = {"w": rng.random(update["w"].shape) < 0.3}
    encoded = encode_sparse(update, masks)
    data = fobs.dumps(_shareable(encoded), max_value_size=1024)  # every values/positions blob becomes a datum
    decoded = decode_sparse(from_shareable(fobs.loads(data)).data)
    assert decoded["w"].tobytes() == _expected(update["w"], masks["w"]).tobytes()


def test_registration_is_idempotent():
    count = fobs.num_decomposers()
    register_sparse_decomposers()
    register_sparse_decomposers()
    assert fobs.num_decomposers() == count
    assert isinstance(fobs_registry._decomposers[SPARSE_TYPE_NAME], SparseTensorDecomposer)


def test_an_unregistered_sender_refuses_to_send(monkeypatch):
    # a process that never called register_sparse_decomposers(), simulated by removing the entry
    monkeypatch.delitem(fobs_registry._decomposers, SPARSE_TYPE_NAME)
    with pytest.raises(RuntimeError, match="can't be serialized by FOBS without a decomposer"):
        fobs.dumps(_shareable({"w": GOOD_INDICES}))
    assert SPARSE_TYPE_NAME not in fobs_registry._decomposers  # no generic data-class decomposer slipped in


def test_an_unregistered_receiver_refuses_the_message(monkeypatch):
    data = fobs.dumps(_shareable({"w": GOOD_INDICES}))
    monkeypatch.delitem(fobs_registry._decomposers, SPARSE_TYPE_NAME)
    with pytest.raises(ValueError, match="SparseTensorDecomposer must be registered"):
        fobs.loads(data)


def _tampered(**changes):
    def decompose(self, target, manager=None):
        payload = ORIGINAL_DECOMPOSE(self, target, manager)
        payload.update(changes)
        for key in [k for k, v in changes.items() if v is DROP]:
            del payload[key]
        return payload

    return decompose


DROP = object()
ORIGINAL_DECOMPOSE = SparseTensorDecomposer.decompose


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dtype": "object"}, "unknown dtype 'object'"),
        ({"values": b"\x00" * 7}, "values has 7 bytes, not a multiple of 4"),
        ({"values": "text"}, "values must be bytes, got str"),
        ({"positions_dtype": "int64"}, "indices dtype must be one of"),
        ({"positions_dtype": "float32"}, "indices dtype must be one of"),
        ({"encoding": "rle"}, "unknown encoding 'rle'"),
        ({"shape": [2, -5]}, "shape must be a list of ints >= 0"),
        ({"shape": "2x5"}, "shape must be a list of ints >= 0"),
        ({"format": 2}, "format 2, this code reads 1"),
        ({"shape": DROP}, "expected keys"),
        ({"extra": 1}, "expected keys"),
    ],
)
def test_a_malformed_fobs_payload_fails_the_whole_message(monkeypatch, changes, message):
    monkeypatch.setattr(SparseTensorDecomposer, "decompose", _tampered(**changes))
    data = fobs.dumps(_shareable({"w": GOOD_INDICES}))
    with pytest.raises(SparsePayloadError, match=message):
        fobs.loads(data)


def test_a_well_framed_but_inconsistent_fobs_payload_is_refused_at_decode_naming_the_tensor(monkeypatch):
    out_of_range = np.array([0, 4, 200], np.uint8).tobytes()
    monkeypatch.setattr(SparseTensorDecomposer, "decompose", _tampered(positions=out_of_range))
    dxo = from_shareable(fobs.loads(fobs.dumps(_shareable({"w": GOOD_INDICES}))))
    with pytest.raises(SparsePayloadError, match="sparse tensor 'w': indices out of range"):
        decode_sparse(dxo.data)


# --- size on the wire ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segresnet_update():
    """Random float32 values in the shapes of a SegResNet with 16 initial filters (~4.7M entries)."""
    from medflare.training.model_spec import DEFAULT_SEGRESNET, build_model

    spec = copy.deepcopy(DEFAULT_SEGRESNET)
    spec["args"]["init_filters"] = 16
    shapes = {name: tuple(value.shape) for name, value in build_model(spec).state_dict().items()}
    rng = np.random.default_rng(2024)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("fraction_shared, max_ratio", [(0.1, 0.15), (0.4, 0.5)])
def test_sparse_segresnet_update_is_a_fraction_of_the_dense_bytes(segresnet_update, fraction_shared, max_ratio):
    from medflare.privacy.percentile_sharing import share_largest_fraction

    assert 4_500_000 < sum(v.size for v in segresnet_update.values()) < 5_000_000
    shared, summary = share_largest_fraction(segresnet_update, fraction_shared, None)
    encoded = encode_sparse(shared)
    assert sum(t.num_kept for t in encoded.values()) == summary.num_shared

    dense_bytes = serialized_size(_shareable(shared))
    sparse_bytes = serialized_size(_shareable(encoded))
    assert sparse_bytes <= max_ratio * dense_bytes, f"{sparse_bytes / dense_bytes:.3f} of the dense bytes"

    decoded = decode_sparse(from_shareable(fobs.loads(fobs.dumps(_shareable(encoded)))).data)
    for name, array in shared.items():
        # equal values; the dense form carries -0.0 where a negative entry was withheld, this 0.0
        np.testing.assert_array_equal(decoded[name], array, strict=True)
