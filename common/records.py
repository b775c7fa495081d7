"""Flat dataclasses of scalars <-> mappings: the one codec behind configs and wire records.

Flower carries run and node configuration, and fedhead's own messages, as flat
mappings of str/int/float/bool. ``FlatRecord`` gives a dataclass of such fields its
field types and a plain dict; ``coerce`` checks one value against its field's type.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

SCALAR_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


class FlatRecord:
    """Base of dataclasses whose fields are all str, int, float or bool."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @classmethod
    def fields(cls) -> list[dataclasses.Field[Any]]:
        return list(dataclasses.fields(cls))

    @classmethod
    def field_type(cls, f: dataclasses.Field[Any]) -> type:
        return SCALAR_TYPES[f.type if isinstance(f.type, str) else f.type.__name__]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def drawing_on(cls, source: Any, **values: Any) -> Self:
        """One with ``values``, and every other field that the dataclass ``source`` has a
        field of the same name for taken from it: where two records speak of the same
        thing they use one name, so the value is derived, not copied by hand."""
        theirs = {f.name for f in dataclasses.fields(source)}
        taken = {
            f.name: getattr(source, f.name)
            for f in cls.fields()
            if f.name not in values and f.name in theirs
        }
        return cls(**taken, **values)


def coerce(value: Any, typ: type) -> Any:
    """``value`` as a ``typ`` field accepts it (an int for a float; never a bool for an
    int); TypeError if it does not fit."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise TypeError(f"expected {typ.__name__}, got {type(value).__name__}")
    return value
