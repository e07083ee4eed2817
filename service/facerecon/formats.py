"""The names of the outputs, defined once (a leaf module with no dependencies, so the CLI's argument parser, the
API's schemas and the writers share them without importing each other)."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MESH_FORMATS", "ON_MISSING_CHOICES", "TEXTURED_FORMATS", "TEXTURE_CHOICES", "MeshFormat", "OnMissing",
           "TextureChoice", "TextureKind", "texture_format_problem"]

#: Mesh file formats.
MeshFormat = Literal["obj", "ply", "glb"]
MESH_FORMATS: tuple[str, ...] = get_args(MeshFormat)
#: What a texture is made from.
TextureKind = Literal["photo", "albedo"]
#: A request's texture option (``none``: per-vertex colours).
TextureChoice = Literal["none", "photo", "albedo"]
TEXTURE_CHOICES: tuple[str, ...] = get_args(TextureChoice)
#: The mesh formats that can carry a texture (OBJ + MTL + PNG bundle, GLB with the image embedded).
TEXTURED_FORMATS: tuple[str, ...] = ("obj", "glb")
#: What a photo set does with a photo in which no face is found: ``fail`` the whole set (the default) or ``skip``
#: the photo (the answer lists the skipped photos).
OnMissing = Literal["fail", "skip"]
ON_MISSING_CHOICES: tuple[str, ...] = get_args(OnMissing)


def texture_format_problem(texture: str, fmt: str) -> str | None:
    """Why a ``texture`` cannot be given in the output format ``fmt`` (``None`` when it can): the one rule that the
    CLI, the API (a 422) and the exporters apply."""
    if texture != "none" and fmt not in TEXTURED_FORMATS:
        return f"texture={texture} needs format=obj or glb, not {fmt} (PLY has per-vertex colours only)"
    return None
