"""The carved-op model: the bottom layer every other part of tapml builds on.

What an operator call is (``OpCall``, ``TensorSpec``), how its arguments are
encoded as JSON (the value codec), how tensors are identified (content keys),
how an op name resolves to an operator safely (``resolve_op``'s allow-list),
and the error and status roots. It imports nothing else of tapml.
"""

from .caches import make_room
from .errors import CheckFailed, OpFailed, OpRefused, TapmlError
from .imports import import_object
from .keys import HashMemo, byte_view, content_digest, content_key, content_mark, mark_content, overwrite
from .opcall import OpCall, bind_args, flatten_outputs, place_device
from .openmp import openmp_spins, record_openmp_spins
from .ops import (
    ALLOWED_NAMESPACES,
    DENIED_OPS,
    UNDECLARED_WRITES,
    UNINITIALIZED,
    OpInfo,
    allow_namespace,
    bump_undeclared,
    library_of,
    load_library,
    op_info,
    op_info_by_name,
    remote_refusal,
    resolve_op,
)
from .status import Status
from .tensors import (
    TensorSpec,
    broadcast_narrowed,
    contiguous_layout,
    dtype_from_name,
    dtype_name,
    relayout,
    storage_order,
)
from .typedjson import SchemaError, from_json, json_schema, jsonable, to_json, validate
from .unit import UnitCall
from .values import (
    MalformedValue,
    Opaque,
    check_spec,
    check_value,
    decode_value,
    encode,
    iter_specs,
    only_tensors,
    tensors_in,
)
from .version import __version__

__all__ = [
    "__version__",
    "ALLOWED_NAMESPACES",
    "DENIED_OPS",
    "UNINITIALIZED",
    "CheckFailed",
    "HashMemo",
    "make_room",
    "MalformedValue",
    "OpCall",
    "openmp_spins",
    "record_openmp_spins",
    "OpFailed",
    "OpInfo",
    "OpRefused",
    "SchemaError",
    "Opaque",
    "Status",
    "TapmlError",
    "TensorSpec",
    "UnitCall",
    "UNDECLARED_WRITES",
    "allow_namespace",
    "bump_undeclared",
    "library_of",
    "load_library",
    "bind_args",
    "broadcast_narrowed",
    "byte_view",
    "check_spec",
    "check_value",
    "content_digest",
    "content_key",
    "content_mark",
    "contiguous_layout",
    "decode_value",
    "dtype_from_name",
    "dtype_name",
    "encode",
    "flatten_outputs",
    "mark_content",
    "place_device",
    "from_json",
    "import_object",
    "iter_specs",
    "json_schema",
    "jsonable",
    "op_info",
    "only_tensors",
    "op_info_by_name",
    "overwrite",
    "relayout",
    "remote_refusal",
    "resolve_op",
    "storage_order",
    "tensors_in",
    "to_json",
    "validate",
]
