"""The panel's settings, stored per scene (``scene.trellis``)."""


import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

MODES = (
    ("IMAGE", "Image", "One image (a file or an image in this file)"),
    ("IMAGES", "Images", "Several views of one object"),
    ("TEXT", "Text", "A text prompt"),
)
OUTPUTS = (
    ("MESH", "Mesh", "A triangle mesh with colours"),
    ("GAUSSIANS", "Gaussians", "3D Gaussians as a point cloud with a preview"),
    ("BOTH", "Both", "Mesh and Gaussians"),
)
MULTI_IMAGE_MODES = (
    ("stochastic", "Stochastic", "Each sampler step is conditioned on one of the images in turn"),
    ("multidiffusion", "Multidiffusion", "Every step averages the predictions of all images"),
)
KEEP_ORIGINAL = (
    ("HIDE", "Hide", "Hide the original object"),
    ("SIDE_BY_SIDE", "Side by side", "Keep the original visible and move the variant beside it"),
)


class TrellisImageItem(bpy.types.PropertyGroup):
    filepath: StringProperty(name="File", subtype="FILE_PATH")
    image: PointerProperty(name="Image", type=bpy.types.Image)


class TrellisSceneSettings(bpy.types.PropertyGroup):
    mode: EnumProperty(name="Mode", items=MODES, default="IMAGE")
    image_path: StringProperty(
        name="Image file", subtype="FILE_PATH",
        description="Image file (RGBA with a transparent background works best)")
    image: PointerProperty(
        name="Image", type=bpy.types.Image,
        description="An image of this Blender file; used instead of the file when set")
    images: CollectionProperty(type=TrellisImageItem)
    images_index: IntProperty(name="Active image", default=0)
    multi_image_mode: EnumProperty(name="Multi-image mode", items=MULTI_IMAGE_MODES,
                                   default="stochastic")
    prompt: StringProperty(name="Prompt", description="What to make (text mode and variants)")
    seed: IntProperty(name="Seed", default=42, min=0)
    ss_steps: IntProperty(name="Structure steps", default=0, min=0, max=1000,
                          description="Sparse-structure sampler steps (0: the model's default)")
    ss_cfg: FloatProperty(name="Structure CFG", default=-1.0, min=-1.0, max=100.0,
                          description="Sparse-structure guidance strength (-1: the model's default)")
    slat_steps: IntProperty(name="Latent steps", default=0, min=0, max=1000,
                            description="Structured-latent sampler steps (0: the model's default)")
    slat_cfg: FloatProperty(name="Latent CFG", default=-1.0, min=-1.0, max=100.0,
                            description="Structured-latent guidance strength (-1: the model's default)")
    outputs: EnumProperty(name="Outputs", items=OUTPUTS, default="MESH")
    keep_original: EnumProperty(name="Original", items=KEEP_ORIGINAL, default="HIDE",
                                description="What happens to the original object of a variant")
    region_source: EnumProperty(
        name="Region",
        items=(("FACES", "Selected faces", "Faces selected in Edit Mode"),
               ("BOX", "Box empty", "The bounds of an empty")),
        default="FACES")
    region_box: PointerProperty(name="Box", type=bpy.types.Object,
                                poll=lambda self, obj: obj.type == "EMPTY")
    show_sampling: BoolProperty(name="Sampling", default=False)

    def sampling(self) -> dict:
        """Sampler overrides for the client (None = the model's default)."""
        return {
            "seed": self.seed,
            "ss_steps": self.ss_steps or None,
            "ss_cfg": self.ss_cfg if self.ss_cfg >= 0 else None,
            "slat_steps": self.slat_steps or None,
            "slat_cfg": self.slat_cfg if self.slat_cfg >= 0 else None,
        }

    def formats(self) -> list:
        return {"MESH": ["mesh"], "GAUSSIANS": ["gaussian"], "BOTH": ["mesh", "gaussian"]}[
            self.outputs]


classes = (TrellisImageItem, TrellisSceneSettings)


def register():
    bpy.types.Scene.trellis = PointerProperty(type=TrellisSceneSettings)


def unregister():
    del bpy.types.Scene.trellis
