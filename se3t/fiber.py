"""The fiber: which degrees a feature holds and how many channels each has."""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Mapping, Tuple, Union

import torch

__all__ = ["Fiber", "degree_to_dim", "Features"]

#: Node or edge features: degree -> ``[N, C, 2d+1]`` (nodes) or ``[E, C, 2d+1]`` (edges).
Features = Dict[int, torch.Tensor]


def degree_to_dim(degree: int) -> int:
    """Number of components of a degree-``degree`` feature: ``2d + 1``."""
    return 2 * degree + 1


class Fiber:
    """An immutable, hashable map ``degree -> channels`` (a type descriptor, usable as a cache key).

    >>> f = Fiber({0: 32, 1: 16})
    >>> f[1], f[2], f.degrees, f.num_features
    (16, 0, (0, 1), 80)
    >>> eval(repr(f)) == f
    True

    Degrees with zero channels are dropped, so ``Fiber({0: 4, 1: 0}) == Fiber({0: 4})``.
    """

    __slots__ = ("_items",)

    def __init__(self, structure: Union[Mapping[int, int], Iterable[Tuple[int, int]], "Fiber", None] = None):
        if structure is None:
            structure = {}
        if isinstance(structure, Fiber):
            items = structure._items
        else:
            pairs = structure.items() if isinstance(structure, Mapping) else structure
            merged: Dict[int, int] = {}
            for degree, channels in pairs:
                if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
                    raise ValueError(f"Fiber degrees must be non-negative ints, got {degree!r}")
                if isinstance(channels, bool) or not isinstance(channels, int) or channels < 0:
                    raise ValueError(f"Fiber channels must be non-negative ints, got {channels!r} for degree {degree}")
                if degree in merged:
                    raise ValueError(f"Fiber degree {degree} given twice")
                merged[degree] = channels
            items = tuple(sorted((d, c) for d, c in merged.items() if c > 0))
        object.__setattr__(self, "_items", items)

    def __setattr__(self, name, value):
        raise AttributeError("Fiber is immutable")

    @classmethod
    def create(cls, num_degrees: int, num_channels: int) -> "Fiber":
        """Degrees ``0 .. num_degrees-1``, each with ``num_channels`` channels."""
        if num_degrees < 1 or num_channels < 1:
            raise ValueError(f"Fiber.create needs num_degrees >= 1 and num_channels >= 1, got {num_degrees}, {num_channels}")
        return cls({d: num_channels for d in range(num_degrees)})

    @classmethod
    def from_features(cls, features: Mapping[int, torch.Tensor]) -> "Fiber":
        """The fiber of a feature dict ``{degree: [N, C, 2d+1]}``."""
        return cls({int(d): int(t.shape[-2]) for d, t in features.items()})

    # --- read access -------------------------------------------------------------------------------------------
    @property
    def degrees(self) -> Tuple[int, ...]:
        return tuple(d for d, _ in self._items)

    @property
    def channels(self) -> Tuple[int, ...]:
        return tuple(c for _, c in self._items)

    @property
    def max_degree(self) -> int:
        if not self._items:
            raise ValueError("an empty Fiber has no max_degree")
        return self._items[-1][0]

    @property
    def num_features(self) -> int:
        """Total number of scalars: ``sum(C_d * (2d+1))``."""
        return sum(c * degree_to_dim(d) for d, c in self._items)

    @property
    def uniform_channels(self) -> bool:
        return len(set(self.channels)) <= 1

    def __getitem__(self, degree: int) -> int:
        for d, c in self._items:
            if d == degree:
                return c
        return 0

    def __contains__(self, degree: object) -> bool:
        return any(d == degree for d, _ in self._items)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter(self._items)

    def items(self) -> Tuple[Tuple[int, int], ...]:
        return self._items

    def __len__(self) -> int:
        return len(self._items)

    def as_dict(self) -> Dict[int, int]:
        return dict(self._items)

    # --- value semantics ---------------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if isinstance(other, Fiber):
            return self._items == other._items
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("Fiber", self._items))

    def __repr__(self) -> str:
        return f"Fiber({dict(self._items)!r})"

    def __reduce__(self):
        return (Fiber, (dict(self._items),))

    # --- arithmetic --------------------------------------------------------------------------------------------
    def __add__(self, other: "Fiber") -> "Fiber":
        """Channel-wise sum over the union of degrees (the fiber of a channel concatenation)."""
        if not isinstance(other, Fiber):
            raise TypeError(f"can only add a Fiber to a Fiber, not {type(other).__name__}")
        degrees = sorted(set(self.degrees) | set(other.degrees))
        return Fiber({d: self[d] + other[d] for d in degrees})

    def __mul__(self, factor: int) -> "Fiber":
        if isinstance(factor, bool) or not isinstance(factor, int):
            raise TypeError(f"a Fiber can only be multiplied by an int (channel scaling), not {type(factor).__name__}")
        return Fiber({d: c * factor for d, c in self._items})

    __rmul__ = __mul__

    def __floordiv__(self, divisor: int) -> "Fiber":
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
            raise TypeError(f"a Fiber can only be divided by a positive int, not {divisor!r}")
        return Fiber({d: c // divisor for d, c in self._items})

    def restrict(self, degrees: Iterable[int]) -> "Fiber":
        """The sub-fiber over the given degrees (absent degrees are ignored)."""
        keep = set(degrees)
        return Fiber({d: c for d, c in self._items if d in keep})
