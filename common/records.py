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
        """One with ``values``, and every other field taken from the dataclass
        ``source``'s field of the same name: where two records speak of the same thing
        they use one name, so the value is derived, not copied by hand. A field that is
        neither given nor in ``source`` is an error, never a silent default (a field
        renamed on one side would otherwise quietly take its default)."""
        theirs = {f.name for f in dataclasses.fields(source)}
        missing = [f.name for f in cls.fields() if f.name not in values and f.name not in theirs]
        if missing:
            raise TypeError(
                f"{cls.__name__}.drawing_on({type(source).__name__}): no value for "
                f"{', '.join(missing)}: give it, or name the source's field the same"
            )
        unknown = sorted(set(values) - {f.name for f in cls.fields()})
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
        taken = {f.name: getattr(source, f.name) for f in cls.fields() if f.name not in values}
        return cls(**taken, **values)


def coerce(value: Any, typ: type) -> Any:
    """``value`` as a ``typ`` field accepts it (an int for a float; never a bool for an
    int); TypeError if it does not fit."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise TypeError(f"expected {typ.__name__}, got {type(value).__name__}")
    return value
