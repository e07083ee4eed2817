"""The coefficient vector of a face model, by name.

The reference's BFM vector is 257 = 80 id + 64 exp + 80 tex + 3 angle + 27 gamma + 3 trans (reference.md section 2);
another face model has its own sizes for the first three groups. :class:`CoefficientLayout` comes from the face
model's card, and :class:`Coefficients` is the only place that slices the flat vector, so nothing else uses magic
offsets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: A coefficient group as given: a torch tensor, or a NumPy array (the R-Net's own output on the torch-free path,
#: ``refine=False``); both have ``.shape``, ``.ndim`` and row slicing.
Array = Any

#: Group names in vector order (the reference's head order).
GROUPS: tuple[str, ...] = ("id", "exp", "tex", "angle", "gamma", "trans")


class CoefficientLayout(BaseModel):
    """Sizes of the coefficient groups, in vector order ``id, exp, tex, angle, gamma, trans``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int = Field(gt=0, description="identity shape coefficients")
    exp: int = Field(gt=0, description="expression coefficients")
    tex: int = Field(gt=0, description="albedo coefficients")
    angle: int = Field(3, ge=3, le=3, description="(pitch, yaw, roll), radians")
    gamma: int = Field(27, ge=27, le=27, description="SH lighting, channel-major R[0:9] G[9:18] B[18:27]")
    trans: int = Field(3, ge=3, le=3, description="translation (x, y, z), decimetres")

    @property
    def total(self) -> int:
        return sum(self.sizes())

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, g) for g in GROUPS)

    def slices(self) -> dict[str, slice]:
        out: dict[str, slice] = {}
        start = 0
        for g in GROUPS:
            n = getattr(self, g)
            out[g] = slice(start, start + n)
            start += n
        return out


#: The reference BFM layout (257).
BFM_LAYOUT = CoefficientLayout(id=80, exp=64, tex=80)


class CoefficientArrays(NamedTuple):
    """The groups of a batch as NumPy float32 arrays ``(B, k)`` (:meth:`Coefficients.arrays`; no torch)."""

    id: np.ndarray
    exp: np.ndarray
    tex: np.ndarray
    angle: np.ndarray
    gamma: np.ndarray
    trans: np.ndarray


class Coefficients:
    """Named coefficient groups of a batch of faces; every group is ``(B, k)`` float32.

    ``id`` identity, ``exp`` expression, ``tex`` albedo, ``angle`` (B, 3) radians (θx, θy, θz), ``gamma`` (B, 27)
    SH light (channel-major), ``trans`` (B, 3) decimetres.

    The groups read as attributes are torch tensors on one device, always. Built from NumPy arrays (the R-Net's own
    output, :meth:`from_vector` of an array), the coefficients keep them (:attr:`is_numpy`) and make CPU tensors of
    them, sharing their memory, only when an attribute is first read; :meth:`arrays`, :meth:`to_dict`,
    :meth:`index`, :attr:`layout` and :attr:`batch_size` never need torch, so the R-Net path (JSON answers, NumPy
    decoding, exports) runs without importing it. Immutable.
    """

    __slots__ = ("_np", "_t")

    def __init__(self, id: Array, exp: Array, tex: Array, angle: Array, gamma: Array, trans: Array) -> None:
        groups = dict(zip(GROUPS, (id, exp, tex, angle, gamma, trans), strict=True))
        arrays: dict[str, np.ndarray] | None = None
        tensors: dict[str, Tensor] | None = None
        if all(isinstance(g, np.ndarray) for g in groups.values()):
            arrays = groups
        else:
            import torch

            tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in groups.items()}
        object.__setattr__(self, "_np", arrays)
        object.__setattr__(self, "_t", tensors)
        batch = {g.shape[0] for g in groups.values()}
        if len(batch) != 1 or any(g.ndim != 2 for g in groups.values()):
            raise ValueError("every coefficient group must be a (B, k) tensor with one B")
        for name, size in (("angle", 3), ("gamma", 27), ("trans", 3)):
            if groups[name].shape[1] != size:
                raise ValueError(f"{name} must have {size} columns, got {groups[name].shape[1]}")

    def _stored(self) -> dict[str, Array]:
        return self._np if self._np is not None else self._t  # type: ignore[return-value]

    def _tensor(self, name: str) -> Tensor:
        if self._t is None:  # NumPy coefficients: CPU tensors over the same memory, made once
            import torch

            object.__setattr__(self, "_t", {k: torch.from_numpy(v) for k, v in self._np.items()})  # type: ignore[union-attr]
        return self._t[name]  # type: ignore[index]

    id = property(lambda self: self._tensor("id"), doc="``(B, K_id)`` identity")
    exp = property(lambda self: self._tensor("exp"), doc="``(B, K_exp)`` expression")
    tex = property(lambda self: self._tensor("tex"), doc="``(B, K_tex)`` albedo")
    angle = property(lambda self: self._tensor("angle"), doc="``(B, 3)`` radians")
    gamma = property(lambda self: self._tensor("gamma"), doc="``(B, 27)`` SH light")
    trans = property(lambda self: self._tensor("trans"), doc="``(B, 3)`` decimetres")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Coefficients are immutable")

    def __getstate__(self) -> tuple[dict[str, Array] | None, dict[str, Array] | None]:
        return (self._np, None if self._np is not None else self._t)

    def __setstate__(self, state: tuple[dict[str, Array] | None, dict[str, Array] | None]) -> None:
        object.__setattr__(self, "_np", state[0])
        object.__setattr__(self, "_t", state[1])

    def __repr__(self) -> str:
        kind = "numpy" if self._np is not None else "torch"
        return f"Coefficients(batch={self.batch_size}, {self.layout.sizes()}, {kind})"

    @property
    def is_numpy(self) -> bool:
        """Built from NumPy arrays (no torch needed to read, slice or decode them)."""
        return self._np is not None

    @property
    def batch_size(self) -> int:
        return int(self._stored()["id"].shape[0])

    @property
    def layout(self) -> CoefficientLayout:
        g = self._stored()
        return CoefficientLayout(id=g["id"].shape[1], exp=g["exp"].shape[1], tex=g["tex"].shape[1])

    def arrays(self) -> CoefficientArrays:
        """The groups as NumPy float32 arrays (detached, on the CPU; NumPy coefficients' own arrays)."""
        return CoefficientArrays(*(_numpy(self._stored()[g]).astype(np.float32, copy=False) for g in GROUPS))

    @classmethod
    def from_vector(cls, vector: Array, layout: CoefficientLayout) -> Coefficients:
        """Split ``(B, layout.total)`` (or ``(layout.total,)``, taken as B = 1) into named groups (views of a
        tensor, or of a NumPy array: then NumPy coefficients)."""
        if vector.ndim == 1:
            vector = vector[None]
        if vector.ndim != 2 or vector.shape[1] != layout.total:
            raise ValueError(f"expected a (B, {layout.total}) coefficient vector, got {tuple(vector.shape)}")
        return cls(**{g: vector[:, s] for g, s in layout.slices().items()})

    @classmethod
    def zeros(cls, layout: CoefficientLayout, batch: int = 1, device: torch.device | str = "cpu") -> Coefficients:
        """The mean face: neutral, frontal, at the origin, ambient light 0.8 (the zero-initialised R-Net)."""
        import torch

        return cls.from_vector(torch.zeros(batch, layout.total, device=device), layout)

    def to_vector(self) -> Tensor:
        """``(B, total)`` tensor in the layout's order (:meth:`arrays` for NumPy)."""
        import torch

        return torch.cat([self._tensor(g) for g in GROUPS], dim=1)

    def to(self, device: torch.device | str) -> Coefficients:
        """Torch coefficients on ``device``."""
        return Coefficients(*(self._tensor(g).to(device) for g in GROUPS))

    def numpy(self) -> Coefficients:
        """NumPy coefficients (detached, on the CPU); NumPy coefficients are returned as they are."""
        return self if self._np is not None else Coefficients(*self.arrays())

    def detach(self) -> Coefficients:
        if self._np is not None:
            return self
        return Coefficients(*(self._tensor(g).detach() for g in GROUPS))

    def index(self, i: int) -> Coefficients:
        """The ``i``-th face as a batch of one (NumPy stays NumPy)."""
        return Coefficients(*(self._stored()[g][i : i + 1] for g in GROUPS))

    @classmethod
    def cat(cls, parts: list[Coefficients]) -> Coefficients:
        """Batches stacked along B, in order (NumPy when every part is)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if all(p.is_numpy for p in parts):
            return cls(**{g: np.concatenate([p._stored()[g] for p in parts]) for g in GROUPS})
        import torch

        return cls(**{g: torch.cat([p._tensor(g) for p in parts]) for g in GROUPS})

    def to_dict(self, i: int = 0) -> dict[str, list[float]]:
        """Face ``i`` as plain lists by group name (for JSON)."""
        return {g: _numpy(self._stored()[g][i]).astype(np.float64).tolist() for g in GROUPS}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]], device: torch.device | str = "cpu") -> Coefficients:
        import torch

        return cls(**{g: torch.tensor([data[g]], dtype=torch.float32, device=device) for g in GROUPS})


def _numpy(t: Array) -> np.ndarray:
    """A group as a NumPy array (a tensor is detached and moved to the CPU first)."""
    if isinstance(t, np.ndarray):
        return t
    return t.detach().cpu().numpy()
