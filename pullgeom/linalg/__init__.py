"""Small batched linear algebra in plain torch: the reference the native kernels match."""

from pullgeom.linalg.eigh import canonical_signs, symmetric_eig_descending

__all__ = ["canonical_signs", "symmetric_eig_descending"]
