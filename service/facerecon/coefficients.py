"""The coefficient vector of a face model, by name.

The reference's BFM vector is 257 = 80 id + 64 exp + 80 tex + 3 angle + 27 gamma + 3 trans (reference.md section 2);
another face model has its own sizes for the first three groups. :class:`CoefficientLayout` comes from the face
model's card, and :class:`Coefficients` is the only place that slices the flat vector, so nothing else uses magic
offsets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

#: A coefficient group: a torch tensor (fitting, training, decoding on a device) or a NumPy array (the R-Net's own
#: output on the torch-free path, ``refine=False``); both have ``.shape``, ``.ndim`` and row slicing.
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


@dataclass(frozen=True)
class Coefficients:
    """Named coefficient groups of a batch of faces; every field is ``(B, k)`` float32, all torch tensors on one
    device or all NumPy arrays (the torch-free R-Net path; :meth:`to` makes tensors of them, :meth:`numpy` arrays).

    ``id`` identity, ``exp`` expression, ``tex`` albedo, ``angle`` (B, 3) radians (θx, θy, θz), ``gamma`` (B, 27)
    SH light (channel-major), ``trans`` (B, 3) decimetres.
    """

    id: Array
    exp: Array
    tex: Array
    angle: Array
    gamma: Array
    trans: Array

    def __post_init__(self) -> None:
        batch = {t.shape[0] for t in self._tensors()}
        if len(batch) != 1 or any(t.ndim != 2 for t in self._tensors()):
            raise ValueError("every coefficient group must be a (B, k) tensor with one B")
        for name, size in (("angle", 3), ("gamma", 27), ("trans", 3)):
            if getattr(self, name).shape[1] != size:
                raise ValueError(f"{name} must have {size} columns, got {getattr(self, name).shape[1]}")

    def _tensors(self) -> Iterator[Array]:
        return (getattr(self, f.name) for f in fields(self))

    @property
    def is_numpy(self) -> bool:
        """The groups are NumPy arrays (no torch needed to read or decode them)."""
        return isinstance(self.id, np.ndarray)

    @property
    def batch_size(self) -> int:
        return self.id.shape[0]

    @property
    def layout(self) -> CoefficientLayout:
        return CoefficientLayout(id=self.id.shape[1], exp=self.exp.shape[1], tex=self.tex.shape[1])

    @classmethod
    def from_vector(cls, vector: Array, layout: CoefficientLayout) -> Coefficients:
        """Split ``(B, layout.total)`` (or ``(layout.total,)``, taken as B = 1) into named groups (views of a
        tensor or of a NumPy array, as given)."""
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

    def to_vector(self) -> Array:
        """``(B, total)`` in the layout's order (a tensor, or a NumPy array for NumPy groups)."""
        if self.is_numpy:
            return np.concatenate(list(self._tensors()), axis=1)
        import torch

        return torch.cat(list(self._tensors()), dim=1)

    def to(self, device: torch.device | str) -> Coefficients:
        """Torch tensors on ``device`` (NumPy groups are converted; imports torch)."""
        import torch

        return Coefficients(*(torch.as_tensor(t).to(device) for t in self._tensors()))

    def numpy(self) -> Coefficients:
        """NumPy float32 groups (detached, on the CPU); NumPy groups are returned as they are."""
        if self.is_numpy:
            return self
        return Coefficients(*(_numpy(t).astype(np.float32, copy=False) for t in self._tensors()))

    def detach(self) -> Coefficients:
        if self.is_numpy:
            return self
        return Coefficients(*(t.detach() for t in self._tensors()))

    def index(self, i: int) -> Coefficients:
        """The ``i``-th face as a batch of one."""
        return Coefficients(*(t[i : i + 1] for t in self._tensors()))

    @classmethod
    def cat(cls, parts: list[Coefficients]) -> Coefficients:
        """Batches stacked along B, in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if all(p.is_numpy for p in parts):
            return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})
        import torch

        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def to_dict(self, i: int = 0) -> dict[str, list[float]]:
        """Face ``i`` as plain lists by group name (for JSON)."""
        return {f.name: _numpy(getattr(self, f.name)[i]).astype(np.float64).tolist() for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]], device: torch.device | str = "cpu") -> Coefficients:
        import torch

        return cls(**{g: torch.tensor([data[g]], dtype=torch.float32, device=device) for g in GROUPS})


def _numpy(t: Array) -> np.ndarray:
    """A group as a NumPy array (a tensor is detached and moved to the CPU first)."""
    if isinstance(t, np.ndarray):
        return t
    return t.detach().cpu().numpy()
