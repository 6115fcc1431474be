"""Exports of napari-muvit models to other ecosystems (bioimage.io model packages)."""

from napari_muvit.export.bioimageio import export_bioimageio

__all__ = ["export_bioimageio"]
