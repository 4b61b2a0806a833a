"""The restricted unpickler: plain values and numpy arrays load, nothing a pickle names is called."""

from __future__ import annotations

import codecs
import os
import pickle
import struct
import warnings

import numpy as np
import pytest

from stages.io.safe_pickle import PickleFileError, UnsafePickleError, load_pickle

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


class Point:
    """A custom class: its instances need find_class, which refuses it."""

    def __init__(self, x: int) -> None:
        self.x = x


class RunsCommand:
    """Unpickling an instance would run a shell command (``os.system``)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Calls:
    """Unpickling an instance calls ``function(*args)``."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def dump(tmp_path, obj, protocol=pickle.DEFAULT_PROTOCOL, name="x.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's ``pickle.dump(obj, f, 2)`` writes it: bytes become a Python 2 ``str``
    (SHORT_BINSTRING, its bytes as they are), str a ``unicode`` (BINUNICODE, UTF-8); also ints,
    lists and dicts."""
    out = [b"\x80\x02"]

    def put(value):
        if isinstance(value, bytes):
            out.append(b"U" + bytes([len(value)]) + value)
        elif isinstance(value, str):
            data = value.encode("utf-8")
            out.append(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(value, int):
            out.append(b"J" + struct.pack("<i", value))
        elif isinstance(value, list):
            out.append(b"](")
            for item in value:
                put(item)
            out.append(b"e")
        elif isinstance(value, dict):
            out.append(b"}(")
            for key, item in value.items():
                put(key)
                put(item)
            out.append(b"u")
        else:
            raise TypeError(value)

    put(obj)
    out.append(b".")
    return b"".join(out)


PLAIN = {"list": [1, -2, 3.5, None, True, False], "tuple": (1, ("a", "b")), "text": "caf\u00e9 \u4e2d",
         "bytes": b"\x00\xff\x80abc", "empty": b"", "set": {1, 2, 3}, "frozenset": frozenset({"a"}),
         "nested": {"k": [{"x": 1}]}, 2: "int key", "big": 2**70}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_values_load_at_every_protocol(tmp_path, protocol):
    """Below protocol 3 Python 3 writes bytes as _codecs.encode(text, 'latin1') and sets as set([...]):
    those rebuild the value and nothing else."""
    assert load_pickle(dump(tmp_path, PLAIN, protocol), "test") == PLAIN


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_code_is_never_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = dump(tmp_path, {"refs": [RunsCommand(f"touch {marker}")]}, protocol)
    with pytest.raises(UnsafePickleError) as info:
        load_pickle(path, "RefCOCO refs")
    assert not marker.exists()
    message = str(info.value)
    assert f"{os.system.__module__}.system" in message          # posix.system (nt.system on Windows)
    assert str(path) in message and "RefCOCO refs" in message


@pytest.mark.parametrize(("protocol", "refused"), [
    (0, r"copy_reg\._reconstructor"),           # protocols 0 and 1 rebuild instances through it
    (2, rf"{Point.__module__}\.Point"),
    (pickle.HIGHEST_PROTOCOL, rf"{Point.__module__}\.Point"),
])
def test_custom_class_is_refused(tmp_path, protocol, refused):
    path = dump(tmp_path, [Point(3)], protocol)
    for allow_numpy in (False, True):
        with pytest.raises(UnsafePickleError, match=refused):
            load_pickle(path, "test", allow_numpy=allow_numpy)


@pytest.mark.parametrize(("obj", "refused"), [
    (Calls(eval, "1 + 1"), "builtins.eval"),
    (Calls(getattr, [], "append"), "builtins.getattr"),
    (Calls(codecs.decode, "abc", "rot13"), "_codecs.decode"),
])
def test_other_builtins_are_refused(tmp_path, obj, refused):
    with pytest.raises(UnsafePickleError, match=refused):
        load_pickle(dump(tmp_path, obj), "test", allow_numpy=True)


def test_admitted_stand_ins_rebuild_only_their_value(tmp_path):
    """_codecs.encode is admitted with the latin1 codec only; bytes() only without an argument."""
    with pytest.raises(UnsafePickleError, match="refused _codecs.encode with codec 'rot13'"):
        load_pickle(dump(tmp_path, Calls(codecs.encode, "abc", "rot13")), "test")
    with pytest.raises(PickleFileError, match="is not a valid pickle: TypeError"):
        load_pickle(dump(tmp_path, Calls(bytes, 10**6)), "test")


def test_numpy_needs_allow_numpy(tmp_path):
    path = dump(tmp_path, {"scores": np.arange(3, dtype=np.float32)})
    with pytest.raises(UnsafePickleError, match=r"numpy\._core\.multiarray\._reconstruct"):
        load_pickle(path, "test")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_and_scalars_load_with_allow_numpy(tmp_path, protocol):
    value = {"f32": np.array([[0.5, 0.25], [1.0, -2.0]], dtype=np.float32), "i64": np.arange(5),
             "bool": np.array([True, False]), "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
             "record": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), "scalar": np.float32(0.75),
             "int_scalar": np.int64(7), "empty": np.zeros((0, 3), dtype=np.uint8)}
    loaded = load_pickle(dump(tmp_path, value, protocol), "test", allow_numpy=True)
    assert set(loaded) == set(value)
    for key, array in value.items():
        assert type(loaded[key]) is type(array) and loaded[key].dtype == array.dtype, key
        np.testing.assert_array_equal(loaded[key], array)


def test_numpy_1_names_load_without_deprecation_warning(tmp_path):
    """numpy 1 pickles name numpy.core.multiarray; they map to the installed numpy's objects."""
    data = pickle.dumps([np.arange(3, dtype=np.float32), np.float32(2.5)], protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "np1.pkl"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        array, scalar = load_pickle(path, "test", allow_numpy=True)
    np.testing.assert_array_equal(array, [0, 1, 2])
    assert scalar == np.float32(2.5)


def test_object_array_contents_go_through_the_same_check(tmp_path):
    plain = np.array([1, "two", None], dtype=object)
    loaded = load_pickle(dump(tmp_path, plain, name="plain.pkl"), "test", allow_numpy=True)
    assert loaded.dtype == object and list(loaded) == [1, "two", None]
    marker = tmp_path / "pwned"
    evil = np.array([1, RunsCommand(f"touch {marker}")], dtype=object)
    with pytest.raises(UnsafePickleError, match=r"\.system"):
        load_pickle(dump(tmp_path, evil, name="evil.pkl"), "test", allow_numpy=True)
    assert not marker.exists()


def test_python2_str_is_decoded_as_utf8(tmp_path):
    """A Python 2 str (SHORT_BINSTRING: bytes) is decoded as UTF-8: ASCII as by default, UTF-8 text
    correctly (latin1 would make mojibake of it); a Python 2 unicode (BINUNICODE) is always UTF-8."""
    path = tmp_path / "refs.p"
    path.write_bytes(py2_pickle([{b"split": b"val", b"sent": "caf\u00e9".encode(), b"raw": "na\u00efve",
                                  b"ref_id": 3}]))
    assert load_pickle(path, "RefCOCO refs") == [{"split": "val", "sent": "caf\u00e9", "raw": "na\u00efve",
                                                  "ref_id": 3}]
    path.write_bytes(py2_pickle([b"\xff\xfe"]))
    with pytest.raises(PickleFileError, match="a Python 2 str is not utf-8 text") as info:
        load_pickle(path, "RefCOCO refs")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    (None, "test file not found"),
    (b"", "is not a valid pickle: EOFError"),
    (b"not a pickle", "is not a valid pickle"),
    (pickle.dumps(list(range(100)))[:-20], "is not a valid pickle"),
    (b"\x80\x02P0\n.", "is not a valid pickle"),        # a persistent id
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "x.pkl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PickleFileError, match=message) as info:
        load_pickle(path, "test")
    assert str(path) in str(info.value)
    assert not isinstance(info.value, UnsafePickleError)
