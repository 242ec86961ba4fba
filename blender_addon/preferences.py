"""Add-on preferences: where the daemon is, whether to start it, its address, tier, precision and
the models it serves."""


import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

TIERS = (
    ("auto", "Auto", "Chosen by the daemon from the free GPU memory"),
    ("high", "High", "Every network stays on the GPU (about 7 GB at peak)"),
    ("medium", "Medium", "Only the running stage's networks on the GPU (about 3.2 GB at peak)"),
    ("low", "Low", "As medium, the three decoders one at a time (about 2.8 GB at peak)"),
    ("minimal", "Minimal", "As low for now (about 2.8 GB at peak)"),
)
PRECISIONS = (
    ("auto", "Auto", "Chosen by the daemon for the device and tier"),
    ("fp32", "FP32", "32-bit floats everywhere"),
    ("fp16", "FP16", "16-bit floats where the networks allow"),
    ("bf16", "BF16", "bfloat16 where the GPU has it"),
)


def addon_package() -> str:
    """The add-on's package name (``bl_ext.<repo>.trellis_rs`` when installed as an extension)."""
    return __package__ or __name__.rpartition(".")[0]


def get(context=None) -> "TrellisPreferences":
    context = context or bpy.context
    return context.preferences.addons[addon_package()].preferences


class TrellisPreferences(bpy.types.AddonPreferences):
    bl_idname = addon_package()

    daemon_path: StringProperty(
        name="Daemon binary",
        description="Path of the trellisd executable",
        subtype="FILE_PATH",
        default="",
    )
    auto_start: BoolProperty(
        name="Start the daemon when needed",
        description="When no daemon answers, start `trellisd serve` with the settings below",
        default=True,
    )
    socket: StringProperty(
        name="Socket",
        description="Daemon address (socket path or named pipe); empty: the default, or "
        "$TRELLIS_RS_SOCKET",
        default="",
    )
    tier: EnumProperty(name="Memory tier", items=TIERS, default="auto",
                       description="Memory tier of a daemon this add-on starts")
    precision: EnumProperty(name="Precision", items=PRECISIONS, default="auto",
                            description="Precision of a daemon this add-on starts")
    image_model: StringProperty(
        name="Image model",
        description="Image-to-3D pipeline (hub id or folder) the daemon serves",
        default="microsoft/TRELLIS-image-large",
    )
    text_model: StringProperty(
        name="Text model",
        description="Text-to-3D pipeline (hub id or folder) the daemon serves; empty: none",
        default="microsoft/TRELLIS-text-large",
    )
    image_cond_model: StringProperty(
        name="Image conditioner",
        description="DINOv2 override (hub id or folder); empty: the one the pipeline names",
        default="",
    )
    text_cond_model: StringProperty(
        name="Text conditioner",
        description="CLIP override (hub id or folder); empty: the one the pipeline names",
        default="",
    )
    extra_args: StringProperty(
        name="Extra arguments",
        description="More `trellisd serve` arguments, separated by spaces",
        default="",
    )

    def serve_args(self) -> list:
        """Arguments of `trellisd serve` besides the models."""
        args = []
        if self.tier != "auto":
            args += ["--vram-tier", self.tier]
        if self.precision != "auto":
            args += ["--precision", self.precision]
        if self.image_cond_model:
            args += ["--image-cond-model", bpy.path.abspath(self.image_cond_model)]
        if self.text_cond_model:
            args += ["--text-cond-model", bpy.path.abspath(self.text_cond_model)]
        args += self.extra_args.split()
        return args

    def models(self) -> list:
        return [bpy.path.abspath(m) if m.startswith("//") else m
                for m in (self.image_model, self.text_model) if m]

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        col.prop(self, "daemon_path")
        col.prop(self, "auto_start")
        col.prop(self, "socket")
        row = col.row()
        row.prop(self, "tier")
        row.prop(self, "precision")
        box = layout.box()
        box.label(text="Models")
        box.prop(self, "image_model")
        box.prop(self, "text_model")
        box.prop(self, "image_cond_model")
        box.prop(self, "text_cond_model")
        layout.prop(self, "extra_args")


classes = (TrellisPreferences,)
