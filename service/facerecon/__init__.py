"""facerecon: 3D face reconstruction from one photo or a photo set (Deng et al. 2019), as a library, CLI and
REST service."""

__version__ = "0.1.0"
