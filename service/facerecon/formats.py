"""The names of the outputs, defined once (a leaf module with no dependencies, so the CLI's argument parser, the
API's schemas and the writers share them without importing each other)."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MESH_FORMATS", "TEXTURED_FORMATS", "TEXTURE_CHOICES", "MeshFormat", "TextureChoice", "TextureKind"]

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
