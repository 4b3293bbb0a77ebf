"""Element types as the file formats name them, without torch.

A stored tensor's dtype only has to be named, sized and written back; the checkpoint library
keeps it as a :class:`DType` so that reading and writing files never imports torch (about 3 s
per command). Values are computed in numpy (``DType.numpy``); ``DType.torch`` gives torch's own
dtype where torch tensors are made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    name: str  # torch's attribute name, as pickles name it: ``torch.bfloat16`` -> "bfloat16"
    itemsize: int
    safetensors: str  # the safetensors header's name
    storage: str | None  # torch's typed storage class in ``torch.save`` pickles; None: untyped (float8)
    numpy: str  # numpy's element type holding the values; bfloat16 and float8 (which numpy lacks): their bits

    def __str__(self) -> str:
        return f"torch.{self.name}"  # as torch prints its dtypes

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.name)


DTYPES: tuple[DType, ...] = (
    DType("float64", 8, "F64", "DoubleStorage", "<f8"),
    DType("float32", 4, "F32", "FloatStorage", "<f4"),
    DType("float16", 2, "F16", "HalfStorage", "<f2"),
    DType("bfloat16", 2, "BF16", "BFloat16Storage", "<u2"),
    DType("int64", 8, "I64", "LongStorage", "<i8"),
    DType("int32", 4, "I32", "IntStorage", "<i4"),
    DType("int16", 2, "I16", "ShortStorage", "<i2"),
    DType("int8", 1, "I8", "CharStorage", "i1"),
    DType("uint8", 1, "U8", "ByteStorage", "u1"),
    DType("bool", 1, "BOOL", "BoolStorage", "?"),
    DType("float8_e4m3fn", 1, "F8_E4M3", None, "u1"),
    DType("float8_e5m2", 1, "F8_E5M2", None, "u1"),
)
BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in DTYPES}
BY_STORAGE: dict[str, DType] = {d.storage: d for d in DTYPES if d.storage is not None}
UINT8 = BY_NAME["uint8"]


def dtype_of(value: Any) -> DType:
    """The DType of a torch dtype (``torch.bfloat16`` prints as "torch.bfloat16"), or of a DType."""
    if isinstance(value, DType):
        return value
    try:
        return BY_NAME[str(value).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"element type {value} is not supported") from None
