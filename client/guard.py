"""Which heads a site accepts from the server: the server must not probe its data.

A head is how the server asks questions of a site's images: evaluating it, or training
from it and reporting the loss, tells the server how that head does on them. A site
therefore accepts only heads it can account for:

1. **Exactly the run's trainable tensors, checked before decoding.** Every head in a
   train, evaluate or outcome message must hold the run's trainable set (names, shapes,
   dtypes: ``TrainableSet``, computed by the site itself at prepare and kept in its node
   state), read from each array's declared shape and dtype, or for the legacy
   Parameters of train and evaluate messages from the ``.npy`` header, before anything
   turns the bytes into arrays (a 100 MB head costs no more than its bytes).

Refusals are one line in the site's log (``RefusedHeadError``), an error reply naming
only the kind of problem, and ``fedhead_site_heads_refused_total{reason}``. Numpy
only: the ClientApp checks heads before it hands any work to torch.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedhead.common.errors import FederationError, ModelMismatchError, RefusedHeadError
from fedhead.common.heads import TrainableSet
from fedhead.common.protocol import RunSpec
from fedhead.common.telemetry import SiteRefusedHead, emit

RECORD_TRAINABLE = "fedhead.trainable"  # ConfigRecord in the node's state: the run's set
_NPY_HEADER_MAX = 1 << 16  # numpy writes headers of a few hundred bytes
PROBING = "the server may be probing this site's data: tell its operator"
# Why a head is refused (a bounded metrics label; cli.metrics pre-initialises them).
REFUSALS = ("shape", "initial", "step", "stale", "settings", "unbounded", "non_finite")


def keep_trainable(context: Context, trainable: TrainableSet, spec: RunSpec) -> None:
    """Remember the run's trainable set in the node's state (at prepare)."""
    if trainable.fingerprint() != spec.trainable_fingerprint:
        raise ModelMismatchError(
            "this site's model has other trainable tensors than the server's "
            f"({len(trainable.tensors)} tensors, {trainable.num_params} parameters)",
            "server and site must run the same fedhead version",
        )
    context.state.config_records[RECORD_TRAINABLE] = ConfigRecord({"set": trainable.to_json()})


def prepared_trainable(context: Context) -> TrainableSet:
    """The run's trainable set this node was prepared with."""
    record = context.state.config_records.get(RECORD_TRAINABLE)
    if record is None:
        raise FederationError(
            "this node was not prepared for the run (it joined after the run started?)",
            "it takes part from the next run on",
        )
    return TrainableSet.from_json(str(record["set"]))


# --- 1. the declared tensors ---------------------------------------------------------
def refuse(reason: str, what: str, hint: str = PROBING) -> RefusedHeadError:
    """The error for a refused head, counted (``reason``: a bounded metrics label)."""
    emit(SiteRefusedHead(reason))
    return RefusedHeadError(what, hint)


def declared(array: Array) -> tuple[tuple[int, ...], np.dtype, int]:
    """An array's shape, dtype and size in bytes as its own header says, without
    decoding it: the ``.npy`` header for numpy arrays (legacy Parameters declare
    nothing else; Arrays made from numpy declare both, and must agree)."""
    if array.stype != "numpy.ndarray":
        raise ValueError(f"a tensor serialized as {array.stype[:32]!r}, not numpy")
    buf = io.BytesIO(array.data[:_NPY_HEADER_MAX])
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise ValueError(f"an .npy header of version {version}")
    if fortran or dtype.hasobject:
        raise ValueError("a tensor in Fortran order or of Python objects")
    if array.dtype and (tuple(array.shape) != shape or array.dtype != str(dtype)):
        raise ValueError(
            f"a tensor declared {array.dtype}{list(array.shape)} holding {dtype}{list(shape)}"
        )
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(array.data) - buf.tell() != nbytes:
        raise ValueError(f"a {dtype}{list(shape)} tensor in {len(array.data)} bytes")
    return shape, dtype, nbytes


def check_declared(record: ArrayRecord, expected: TrainableSet, what: str) -> None:
    """``record`` holds exactly ``expected``'s tensors, in order (keys "0", "1", ...),
    by their declared shapes and dtypes; nothing is decoded."""
    keys = list(record.keys())
    if keys != [str(i) for i in range(len(expected.tensors))]:
        raise refuse(
            "shape",
            f"{what} holds {len(keys)} tensors, the run's trainable set {len(expected.tensors)}",
            "server and site must run the same fedhead version",
        )
    for key, spec in zip(keys, expected.tensors, strict=True):
        try:
            shape, dtype, _ = declared(record[key])
        except ValueError as err:
            raise refuse("shape", f"{what}: tensor {key} ({spec.name}): {err}") from err
        if shape != spec.shape or dtype != np.dtype(spec.dtype):
            raise refuse(
                "shape",
                f"{what}: tensor {key} is {dtype}{list(shape)}, the run's {spec.name} is "
                f"{spec.dtype}{list(spec.shape)}; refused before decoding",
                "server and site must run the same fedhead version",
            )
