"""trellis-rs for Blender: generate 3D assets from images or text with the resident `trellisd`
daemon, make variants of the selected mesh, and import meshes and Gaussians.

Split like Blender's glTF add-on: ``client`` speaks the daemon's protocol (no bpy; scripts can
import it alone), ``importers`` turns arrays into Blender data, ``session`` follows the jobs on a
timer, and ``operators``, ``panel``, ``preferences``, ``props`` are the UI.

Nothing here imports ``bpy`` at package level, so ``from blender_addon import client`` works
outside Blender.
"""

_MODULES = ("preferences", "props", "operators", "panel", "session", "thumbnails")


def _modules():
    import importlib

    return [importlib.import_module(f".{name}", __name__) for name in _MODULES]


def register():
    import bpy

    for mod in _modules():
        for cls in getattr(mod, "classes", ()):
            bpy.utils.register_class(cls)
        if hasattr(mod, "register"):
            mod.register()


def unregister():
    import bpy

    for mod in reversed(_modules()):
        if hasattr(mod, "unregister"):
            mod.unregister()
        for cls in reversed(getattr(mod, "classes", ())):
            bpy.utils.unregister_class(cls)
