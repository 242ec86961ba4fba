"""Thumbnails of finished jobs for the panel's job list: the daemon writes each asset's
``preview.png`` (four views, the mesh above the Gaussians) and names it in the job's ``preview``
field; this module loads those files once into a ``bpy.utils.previews`` collection."""

import os
from typing import Optional

import bpy
import bpy.utils.previews

_COLLECTION = None


def icon_id(path: Optional[str]) -> int:
    """The icon of the PNG at ``path`` (loaded on first use), or 0 when there is none."""
    global _COLLECTION
    if not path or not os.path.isfile(path):
        return 0
    if _COLLECTION is None:
        _COLLECTION = bpy.utils.previews.new()
    item = _COLLECTION.get(path)
    if item is None:
        item = _COLLECTION.load(path, path, "IMAGE")
    return item.icon_id


def register():
    pass


def unregister():
    global _COLLECTION
    if _COLLECTION is not None:
        bpy.utils.previews.remove(_COLLECTION)
        _COLLECTION = None
